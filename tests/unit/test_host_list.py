"""hosts.py: the order hosts are tried in, down marks, and target_session_attrs."""

from __future__ import annotations

import pytest

from pypooler.config import ConfigError, load_settings
from pypooler.hosts import HostList

A, B, C = ("a", 5432), ("b", 5432), ("c", 5433)


def test_round_robin_starts_each_connection_at_the_next_host() -> None:
    hosts = HostList((A, B, C), round_robin=True, down_s=10)
    assert [hosts.order(0)[0] for _ in range(4)] == [A, B, C, A]


def test_disable_tries_them_in_order_and_a_failed_host_goes_last_for_a_while() -> None:
    hosts = HostList((A, B, C), round_robin=False, down_s=10)
    hosts.failed(A, now=100)
    assert hosts.order(105) == [B, C, A]
    assert hosts.order(111) == [A, B, C]
    hosts.failed(B, now=200)
    hosts.succeeded(B)
    assert hosts.order(201) == [A, B, C]


@pytest.mark.parametrize(
    ("wanted", "reported", "accepted"),
    [
        ("any", {"in_hot_standby": "on"}, True),
        ("read-write", {"in_hot_standby": "off", "default_transaction_read_only": "off"}, True),
        ("read-write", {"in_hot_standby": "on"}, False),
        ("read-write", {"default_transaction_read_only": "on"}, False),
        ("read-only", {"in_hot_standby": "on"}, True),
        ("read-only", {"in_hot_standby": "off"}, False),
    ],
)
def test_target_session_attrs(wanted: str, reported: dict[str, str], accepted: bool) -> None:
    assert (
        HostList((A,), round_robin=False, down_s=0, target_session_attrs=wanted).accepts(reported) is accepted
    )


def test_an_entry_lists_hosts_each_with_the_port_or_its_own() -> None:
    def targets(host: str) -> tuple[tuple[str, int], ...]:
        return (
            load_settings(None, env={}, databases={"app": {"host": host, "port": 6000}})
            .databases["app"]
            .targets()
        )

    assert targets("a, b") == (("a", 6000), ("b", 6000))
    assert targets("a:1,b,[::1]:3,::1") == (("a", 1), ("b", 6000), ("::1", 3), ("::1", 6000))
    with pytest.raises(ConfigError, match="an empty name"):
        targets("a,,b")
    with pytest.raises(ConfigError, match="the port must be a number"):
        targets("a:x")
