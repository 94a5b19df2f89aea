"""The throwaway cluster every other integration test stands on: it must start with the asked
settings, store each role's password the way its auth method needs, and leave nothing behind;
a standby of it must stream its changes, refuse writes, and take them once promoted."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pypooler.embedded import (
    DEFAULT_ROLES,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    Role,
    find_bindir,
)
from tests.support.waiting import wait_until

try:
    find_bindir()
except EmbeddedPostgresError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(str(exc), allow_module_level=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(max_connections=5) as cluster:
        yield cluster


def test_settings_are_applied(pg: EmbeddedPostgres) -> None:
    assert pg.psql("SHOW max_connections") == "5"
    assert pg.psql("SHOW fsync") == "off"
    assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
    assert pg.psql("SELECT current_database()") == "pypooler_test"


def test_passwords_are_stored_for_their_auth_method(pg: EmbeddedPostgres) -> None:
    rows = pg.psql(
        "SELECT rolname, coalesce(rolpassword, '') FROM pg_authid"
        " WHERE rolname LIKE 'pp\\_%' ORDER BY rolname"
    )
    stored = dict(line.split("|", 1) for line in rows.splitlines())
    assert set(stored) == {role.name for role in DEFAULT_ROLES}
    assert stored["pp_md5"].startswith("md5")
    assert stored["pp_scram"].startswith("SCRAM-SHA-256$")
    assert stored["pp_trust"] == ""


def test_roles_log_in_with_their_method(pg: EmbeddedPostgres) -> None:
    assert pg.psql("SELECT current_user", user="pp_trust") == "pp_trust"
    # psql fills in the password the role was created with...
    assert pg.psql("SELECT current_user", user="pp_md5") == "pp_md5"
    assert pg.psql("CREATE TABLE scram_can_create (x int)", user="pp_scram") == ""
    # ...and a wrong one is refused, so pg_hba really asks for it.
    with pytest.raises(RuntimeError, match="password authentication failed"):
        pg.psql("SELECT 1", user="pp_scram", password="wrong")
    with pytest.raises(RuntimeError, match="password authentication failed"):
        pg.psql("SELECT 1", user="pp_md5", password="wrong")


def test_dsn() -> None:
    cluster = EmbeddedPostgres(port=25432)
    assert cluster.dsn() == "postgresql://postgres@127.0.0.1:25432/pypooler_test"
    assert (
        cluster.dsn("pp md5", "db", password="p@ss:/")
        == "postgresql://pp%20md5:p%40ss%3A%2F@127.0.0.1:25432/db"
    )


def test_role_validation() -> None:
    with pytest.raises(ValueError, match="needs a password"):
        Role("x", method="md5")
    with pytest.raises(ValueError, match="not one of"):
        Role("x", "pw", method="ident")


def test_restart_then_stop_removes_everything() -> None:
    cluster = EmbeddedPostgres(max_connections=3, roles=[Role("only_me", "pw", "password")])
    cluster.start()
    try:
        tmp_dir, port = cluster.tmp_dir, cluster.port
        assert os.path.isdir(cluster.data_dir)
        cluster.psql("CREATE TABLE survives (x int)", user="only_me")
        cluster.restart()
        assert cluster.port == port
        assert cluster.psql("SELECT count(*) FROM survives", user="only_me") == "0"
    finally:
        cluster.stop()
    assert not os.path.exists(tmp_dir)
    assert not cluster.running
    cluster.stop()  # idempotent


def test_failed_start_leaves_no_server() -> None:
    cluster = EmbeddedPostgres(extra_conf={"shared_buffers": "not a size"})
    with pytest.raises(RuntimeError, match="shared_buffers") as failure:
        cluster.start()
    assert "server log" in str(failure.value)
    assert not cluster.running
    assert cluster.tmp_dir and not os.path.exists(cluster.data_dir)
    cluster.stop()
    assert not cluster.tmp_dir


def test_a_standby_streams_until_promoted() -> None:
    with EmbeddedPostgres(max_connections=4, roles=[], replication=True) as primary:
        primary.psql("CREATE TABLE copied (x int); INSERT INTO copied VALUES (1)")
        standby = EmbeddedPostgres.standby_of(primary)
        with standby:
            standby_dir = standby.tmp_dir
            assert standby.port != primary.port and standby_dir != primary.tmp_dir
            assert standby.psql("SELECT pg_is_in_recovery(), count(*) FROM copied") == "t|1"
            assert standby.psql("SHOW in_hot_standby") == "on"  # what poolers read at login
            with pytest.raises(EmbeddedPostgresError, match="read-only transaction"):
                standby.psql("INSERT INTO copied VALUES (2)")
            primary.psql("INSERT INTO copied VALUES (2)")
            wait_until(lambda: standby.psql("SELECT count(*) FROM copied") == "2", 10, 0.05, "not streamed")
            with pytest.raises(EmbeddedPostgresError, match=r"(?s)not in standby mode.*server log"):
                primary.promote()
            primary.stop_server()
            standby.promote()
            assert standby.psql("INSERT INTO copied VALUES (3); SELECT count(*) FROM copied") == "3"
            assert standby.psql("SHOW in_hot_standby") == "off"
        assert not os.path.exists(standby_dir) and not standby.running


def test_a_standby_of_a_stopped_primary_does_not_start() -> None:
    standby = EmbeddedPostgres.standby_of(EmbeddedPostgres(replication=True))
    with pytest.raises(EmbeddedPostgresError, match="is not running"):
        standby.start()
    assert not standby.running
    standby.stop()
    assert not standby.tmp_dir
