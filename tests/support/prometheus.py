"""Reading pypooler's /metrics in tests, and a collector with traffic in every family to read
without a pooler running."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pypooler.config import load_settings
from pypooler.metrics import MetricsServer
from pypooler.pool import PoolManager
from pypooler.registry import ClientRegistry

APPLICATIONS = ("web", "worker", "cron")


def scrape(url: str) -> dict[str, list[Any]]:
    """Metric families by name -> samples."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample(samples: list[Any], name: str, **labels: str) -> float:
    found = [
        s.value for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]  # fmt: skip
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a scrape can contain: histograms as _bucket/_sum/_count, counters
    as _total, from the # TYPE lines (so families without samples count too)."""
    names: set[str] = set()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            # The text format names a counter's family with or without _total by version.
            names.update(name.removesuffix("_total") + suffix for suffix in suffixes.get(kind, ("",)))
    return names


def metrics_with_traffic(**settings: Any) -> MetricsServer:
    """A MetricsServer (not started) over one pool, app/alice, with traffic in every family:
    each of APPLICATIONS ran transactions; web caused an error and left session state."""
    config = load_settings(
        None, env={}, databases={"app": {"host": "127.0.0.1", "port": 5432, "user": "alice"}}, **settings
    )
    manager = PoolManager(config)
    pool = manager.get_pool("app", "alice")
    assert pool is not None
    for index, name in enumerate(APPLICATIONS):
        stats = pool.stats.for_application(name)
        stats.single.observe(2_000_000 * (index + 1))
        stats.hold_multi.observe(40_000_000)
        stats.query_multi.observe(30_000_000)
        stats.wait_nonzero.observe(5_000_000)
        stats.idle_nonzero.observe(9_000_000)
        stats.login.observe(3_000_000)
        stats.connect_to_first_query.observe(4_000_000)
        stats.logins += 1
        stats.bytes_received += 100
        stats.bytes_sent += 200
    pool.stats.apps["web"].errors["query_wait_timeout"] += 1
    pool.stats.apps["web"].session_state["set"] += 1
    pool.stats.account_statement(b"select * from orders where id = 1", 2_000_000, 0, 1)
    pool.stats.account_statement(b"update orders set paid = true", 9_000_000, 0, 1)
    pool.stats.server_connects += 1
    pool.stats.server_connect.observe(1_000_000)
    registry = ClientRegistry(config, manager)
    registry.errors["max_client_conn"] += 1
    return MetricsServer(manager, registry)
