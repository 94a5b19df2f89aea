"""The Grafana dashboard (config/grafana/pypooler.json) and the Kubernetes files against what the
collector exports: every metric they name exists, every query is scoped to the instance
variable, no panel puts two units on one axis, and the rows follow the diagnosis."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from tests.support.prometheus import exported_names, metrics_with_traffic

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "pypooler.json"
KUBERNETES = sorted((ROOT / "config" / "kubernetes").glob("*.yaml"))
METRIC_NAME = re.compile(r"\b(?:pypooler|process)_[a-z0-9_]+")
SELECTOR = re.compile(r"\b((?:pypooler|process)_[a-z0-9_]+)(\{[^}]*\})?")
INSTANCE = 'instance=~"$instance"'
# Named by the lock-holder panels before the advisor's work that exports them is merged:
# gauges pypooler_holders_blocked{database,user} and pypooler_holders{database,user,state}.
EXPECTED_FROM_THE_ADVISOR = {"pypooler_holders_blocked", "pypooler_holders"}

# What an expression measures, and the units a panel showing it may declare.
UNITS = {
    "seconds": {"s"},
    "count": {"short", "none"},  # things at once, and seconds per second (servers busy, cores)
    "per second": {"ops", "reqps"},
    "bytes": {"bytes"},
    "bytes per second": {"Bps"},
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expressions() -> list[str]:
    found = [target["expr"] for panel in panels() for target in panel["targets"]]
    found += [
        variable["query"]["query"]
        for variable in dashboard()["templating"]["list"]
        if isinstance(variable.get("query"), dict) and variable["name"] != "instance"
    ]
    return found


def measures(expression: str) -> str:
    if "histogram_quantile(" in expression:
        return "seconds"
    name = METRIC_NAME.findall(expression)[0]
    if re.search(r"\b(?:rate|irate|increase)\(", expression):
        if name.endswith(("_seconds_sum", "_seconds_total")):
            return "count"
        return "bytes per second" if name.endswith("_bytes_total") else "per second"
    if name.endswith("_seconds"):
        return "seconds"
    return "bytes" if name.endswith("_bytes") else "count"


def test_every_query_is_scoped_to_the_instance_variable() -> None:
    variables = {variable["name"]: variable for variable in dashboard()["templating"]["list"]}
    assert variables["instance"]["query"]["query"] == "label_values(pypooler_build_info, instance)"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for expression in expressions():
        selectors = SELECTOR.findall(expression)
        assert selectors, expression
        for name, matchers in selectors:
            assert INSTANCE in matchers, (name, expression)
    # process_* are every program's names: those panels keep to the instances that are poolers.
    for expression in expressions():
        if "process_" in expression:
            assert "and on (instance, job) pypooler_build_info" in expression, expression


def test_no_panel_puts_two_units_on_one_axis() -> None:
    for panel in panels():
        if panel["type"] == "heatmap":  # its y axis is the buckets' le, in seconds
            assert panel["fieldConfig"]["defaults"]["unit"] == "s", panel["title"]
            continue
        kinds = {measures(target["expr"]) for target in panel["targets"]}
        assert len(kinds) == 1, (panel["title"], kinds)
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit in UNITS[kinds.pop()], (panel["title"], unit)
        for override in panel["fieldConfig"]["overrides"]:
            assert all(prop["id"] != "unit" for prop in override["properties"]), panel["title"]


def test_every_metric_named_is_exported() -> None:
    exported = exported_names(generate_latest(metrics_with_traffic().prometheus).decode())
    referenced = {name for expression in expressions() for name in METRIC_NAME.findall(expression)}
    for path in KUBERNETES:
        referenced.update(METRIC_NAME.findall(path.read_text()))
    assert {"process_resident_memory_bytes", "process_open_fds", "process_max_fds"} <= referenced
    assert referenced - exported == EXPECTED_FROM_THE_ADVISOR - exported
    assert EXPECTED_FROM_THE_ADVISOR.issubset(referenced)  # the lock-holder panels


def test_holders_blocked_on_locks_have_a_panel_in_the_holders_row() -> None:
    rows = [panel["title"] for panel in dashboard()["panels"] if panel["type"] == "row"]
    assert "blocked on a lock" in rows[1]
    holders = [
        panel for panel in panels() if any("pypooler_holders_blocked" in t["expr"] for t in panel["targets"])
    ]
    assert [panel["title"] for panel in holders] == ["Holders blocked on a lock"]


def test_the_rows_follow_the_diagnosis() -> None:
    heatmap_metrics = {
        name
        for panel in panels()
        if panel["type"] == "heatmap"
        for target in panel["targets"]
        for name in METRIC_NAME.findall(target["expr"])
    }
    assert {"pypooler_checkout_wait_seconds_bucket", "pypooler_hold_seconds_bucket"} <= heatmap_metrics
    rows = [panel["title"] for panel in dashboard()["panels"] if panel["type"] == "row"]
    assert [title[:2] for title in rows[:4]] == ["1.", "2.", "3.", "4."]
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
