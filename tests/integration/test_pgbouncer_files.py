"""A team's pgbouncer.ini and userlist.txt, unchanged, run pypooler; the TOML `pypooler convert`
prints behaves the same; a bad file keeps the running configuration."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pypooler.config import load_settings
from pypooler.embedded import EmbeddedPostgres
from tests.support.poolers import RunningPooler


def realistic_ini(tmp_path: Path, postgres: EmbeddedPostgres) -> Path:
    secret = postgres.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pp_md5'")
    (tmp_path / "userlist.txt").write_text(f'"pp_md5" "{secret}"\n"postgres" "md5{"0" * 32}"\n')
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "databases.ini").write_text(
        "[databases]\n"
        f"pypooler_test = host={postgres.host} port={postgres.port} pool_size=3 min_pool_size=1"
        " max_db_connections=4 reserve_pool=1\n"
        f"* = host={postgres.host} port={postgres.port}\n"
        "\n[users]\npp_md5 = pool_mode=transaction max_user_connections=3\n"
    )
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(
        "; as deployed, comments and all\n"
        f"%include {tmp_path}/conf.d/databases.ini\n"
        "[pgbouncer]\n"
        f"logfile = {tmp_path}/pgbouncer.log\npidfile = {tmp_path}/pgbouncer.pid\n"
        "listen_addr = 127.0.0.1\nlisten_port = 0\n"
        f"unix_socket_dir = {tmp_path}\n"
        "auth_type = md5\nauth_file = " + str(tmp_path / "userlist.txt") + "\n"
        "admin_users = postgres\nstats_users = pp_md5\n"
        "pool_mode = session\nmax_client_conn = 50\ndefault_pool_size = 5\n"
        "reserve_pool_size = 1\nreserve_pool_timeout = 3\nmax_user_connections = 10\n"
        "server_reset_query = DISCARD ALL\nserver_check_query = select 1\nserver_check_delay = 30\n"
        "server_lifetime = 3600\nserver_idle_timeout = 600\nserver_connect_timeout = 15\n"
        "server_login_retry = 15\nquery_wait_timeout = 120\nclient_idle_timeout = 0\n"
        "client_login_timeout = 60\nautodb_idle_timeout = 3600\nidle_transaction_timeout = 0\n"
        "ignore_startup_parameters = extra_float_digits\napplication_name_add_host = 0\n"
        "log_connections = 1\nlog_disconnections = 1\nlog_pooler_errors = 1\nstats_period = 60\n"
        "tcp_keepalive = 1\ntcp_keepidle = 60\nlisten_backlog = 128\ndns_max_ttl = 15\n"
        "server_round_robin = 0\n"
    )  # fmt: skip
    return ini


@pytest.fixture
def run_settings() -> Iterator[Any]:
    started: list[RunningPooler] = []

    def run(path: Path) -> RunningPooler:
        running = RunningPooler(load_settings(path, env={"PYPOOLER_METRICS_PORT": "0"}))
        started.append(running)
        return running

    yield run
    for running in started:
        running.stop()


async def behaviour(pooler: RunningPooler) -> tuple[object, ...]:
    conn = await asyncpg.connect(pooler.dsn(user="pp_md5", password="md5pass"), statement_cache_size=0)
    try:
        user = await conn.fetchval("select current_user")
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pooler.dsn(user="pp_md5", password="wrong"))
    pool = pooler.pool(user="pp_md5")
    return user, pool.mode, pool.size, pool.min_size, pool.reserve_size, pool.bounds[0].limit


async def test_a_pgbouncer_ini_runs_unchanged_and_its_toml_behaves_the_same(
    tmp_path: Path, postgres: EmbeddedPostgres, run_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ini = realistic_ini(tmp_path, postgres)
    converted = subprocess.run(
        [sys.executable, "-m", "pypooler", "convert", str(ini)], capture_output=True, text=True, timeout=30
    )
    assert converted.returncode == 0, converted.stderr
    toml = tmp_path / "pypooler.toml"
    toml.write_text(
        converted.stdout.replace(f'unix_socket_dir = "{tmp_path}"', f'unix_socket_dir = "{tmp_path}/t"')
    )
    (tmp_path / "t").mkdir()
    from_ini = await behaviour(run_settings(ini))
    from_toml = await behaviour(run_settings(toml))
    assert from_ini == from_toml == ("pp_md5", "transaction", 3, 1, 1, 4)


def test_a_bad_file_is_refused_at_start_and_kept_out_at_reload(
    tmp_path: Path, postgres: EmbeddedPostgres, run_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ini = realistic_ini(tmp_path, postgres)
    pooler = run_settings(ini)
    good = ini.read_text()
    ini.write_text(good + "max_client_con = 10\n")  # a typo
    check = subprocess.run(
        [sys.executable, "-m", "pypooler", "check-config", "--config", str(ini)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert (
        check.returncode == 2
        and f"{ini}:" in check.stderr
        and "unknown setting 'max_client_con'" in check.stderr
    )
    pooler.pooler.reload_settings = lambda: load_settings(ini, env={"PYPOOLER_METRICS_PORT": "0"})
    assert pooler.call(lambda: pooler.pooler.reload()) is False
    assert pooler.pooler.settings.max_client_conn == 50
