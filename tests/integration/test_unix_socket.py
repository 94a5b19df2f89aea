"""Unix-domain sockets: the listener (`psql -h DIR -p PORT`, the console, without TCP) and servers
reached through PostgreSQL's own socket (`host = DIR` in [databases])."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pypooler.accepting import bind_unix_socket, unix_socket_path
from pypooler.embedded import EmbeddedPostgres
from tests.support.waiting import eventually


def psql_unix(directory: Path, port: int, database: str, sql: str, user: str = "postgres") -> str:
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-w", "-h", str(directory), "-p", str(port), "-U", user,
         "-d", database, "-c", sql],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_clients_and_the_console_over_the_unix_socket(
    start_pooler: Callable[..., Any], tmp_path: Path
) -> None:
    pooler = start_pooler(unix_socket_dir=str(tmp_path), unix_socket_mode=0o700)
    path = Path(unix_socket_path(str(tmp_path), pooler.port))
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert psql_unix(tmp_path, pooler.port, "pypooler_test", "select 6 * 7") == "42"
    assert "pypooler" in psql_unix(tmp_path, pooler.port, "pgbouncer", "SHOW VERSION")
    conn = await asyncpg.connect(
        host=str(tmp_path), port=pooler.port, user="postgres", database="pypooler_test"
    )
    try:
        assert await conn.fetchval("select $1::int + 1", 41) == 42
    finally:
        await conn.close()
    pooler.call_async(pooler.pooler.stop())
    assert not path.exists()  # removed when the listener closes


def test_a_socket_left_by_a_dead_pooler_is_replaced(tmp_path: Path) -> None:
    path = unix_socket_path(str(tmp_path), 5555)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    sock = bind_unix_socket(str(tmp_path), 5555, 0o777, "", 16)
    try:
        with pytest.raises(OSError, match="another server is listening there"):
            bind_unix_socket(str(tmp_path), 5555, 0o777, "", 16)
    finally:
        sock.close()
        os.unlink(path)


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = Path(unix_socket_path(str(tmp_path), 5556))
    path.write_text("not mine")
    with pytest.raises(OSError, match="not a socket"):
        bind_unix_socket(str(tmp_path), 5556, 0o777, "", 16)
    assert path.read_text() == "not mine"


def test_hba_local_lines_and_peer_authentication(start_pooler: Callable[..., Any], tmp_path: Path) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("local all all peer\nhost all all all reject\n")
    me = pwd.getpwuid(os.getuid()).pw_name
    pooler = start_pooler(
        unix_socket_dir=str(tmp_path), auth_type="hba", auth_hba_file=str(hba), admin_users=[me]
    )
    assert "pypooler" in psql_unix(tmp_path, pooler.port, "pgbouncer", "SHOW VERSION", user=me)

    def console(host: str, user: str) -> subprocess.CompletedProcess[str]:
        argv = ["psql", "-X", "-w", "-h", host, "-p", str(pooler.port), "-U", user, "-d", "pgbouncer"]
        return subprocess.run([*argv, "-c", "SHOW VERSION"], capture_output=True, text=True, timeout=30)

    refused = console(str(tmp_path), "someone_else")
    assert refused.returncode != 0 and 'Peer authentication failed for user "someone_else"' in refused.stderr
    over_tcp = console("127.0.0.1", me)
    assert over_tcp.returncode != 0 and "rejects connection" in over_tcp.stderr


async def test_servers_reached_over_postgresql_unix_socket(
    start_pooler: Callable[..., Any], postgres: EmbeddedPostgres
) -> None:
    # host = a directory: PostgreSQL's own socket there (.s.PGSQL.<port>), as libpq and PgBouncer.
    entry = {"host": postgres.tmp_dir, "port": postgres.port, "pool_size": 1}
    pooler = start_pooler(server_tls_sslmode="require", databases={"pypooler_test": entry})
    conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0)
    direct = await asyncpg.connect(postgres.dsn(dbname="pypooler_test"))
    try:
        # No TLS is asked for over a unix socket (libpq's rule), whatever server_tls_sslmode says.
        local = "select client_addr is null from pg_stat_activity where pid = pg_backend_pid()"
        assert await conn.fetchval(local)
        # A cancel reaches the postmaster through the same socket: the sleep ends at once.
        with pytest.raises(asyncio.TimeoutError):  # asyncpg sends a CancelRequest on timeout
            await conn.execute("select pg_sleep(5)", timeout=0.3)
        sleeping = (
            "select count(*) from pg_stat_activity where query = 'select pg_sleep(5)' and state = 'active'"
        )

        async def sleep_ended() -> bool:
            return bool(await direct.fetchval(sleeping) == 0)

        await eventually(sleep_ended, timeout=2)
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
        await direct.close()
