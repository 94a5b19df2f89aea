"""What a throwaway cluster is configured with, read without starting one: WAL fit for a
standby only when asked, a replication line in pg_hba for the superuser from loopback, and a
standby made with its primary's settings (a hot standby refuses to start with fewer
connections, walsenders and the like than its primary)."""

from __future__ import annotations

import pytest

from pypooler.embedded import EmbeddedPostgres, EmbeddedPostgresError, Role, find_bindir

try:
    find_bindir()  # the constructor looks for the binaries it would run
except EmbeddedPostgresError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(str(exc), allow_module_level=True)


def test_wal_is_minimal_unless_replication_is_asked_for() -> None:
    plain = EmbeddedPostgres()._server_settings(25432)
    assert (plain["wal_level"], plain["max_wal_senders"]) == ("minimal", "0")
    replicating = EmbeddedPostgres(replication=True)._server_settings(25432)
    assert replicating["wal_level"] == "replica"
    # pg_basebackup -X stream takes two walsenders, a streaming standby one more.
    assert int(replicating["max_wal_senders"]) >= 3


def test_the_superuser_may_replicate_from_loopback_only() -> None:
    lines = EmbeddedPostgres()._hba_lines()
    replication = [line for line in lines if line.split()[1:2] == ["replication"]]
    assert replication == ["host replication postgres 127.0.0.1/32 trust"]
    # before the catch-all line, which would ask for a password (first match wins)
    assert lines.index(replication[0]) < lines.index("host all all 127.0.0.1/32 scram-sha-256")


def test_a_standby_is_made_with_its_primarys_settings_and_roles() -> None:
    roles = [Role("only_me", "pw", "md5")]
    primary = EmbeddedPostgres(
        max_connections=7, roles=roles, extra_conf={"work_mem": "8MB"}, replication=True, base_dir="/tmp"
    )
    standby = EmbeddedPostgres.standby_of(primary)
    assert standby.primary is primary and not standby.running
    assert standby._server_settings(25433) == primary._server_settings(25433)
    assert list(standby.roles.values()) == roles
    assert standby.password_of("only_me") == "pw"  # psql() on the standby logs in as on the primary
    assert standby.base_dir == "/tmp"


def test_a_standby_needs_a_primary_with_replication() -> None:
    with pytest.raises(ValueError, match="replication=True"):
        EmbeddedPostgres.standby_of(EmbeddedPostgres())
