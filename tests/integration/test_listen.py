"""LISTEN in transaction mode with listen_mode = "multiplex": one listener connection per pool.

Clients LISTEN through pypooler as they would on PostgreSQL (asyncpg's add_listener, psycopg's
notifies(), plain simple and extended protocol); notifications reach every client listening on
the channel with the notifying backend's real pid, while the pool keeps its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import asyncpg
import psycopg
import pytest

from pypooler.embedded import EmbeddedPostgres
from pypooler.protocol import constants as c
from tests.support.messages import extended
from tests.support.pgwire import RawClient, data_rows, error_fields, row_description
from tests.support.poolers import RunningPooler
from tests.support.prometheus import sample, scrape
from tests.support.waiting import eventually

CONNECT_TIMEOUT_S = 30
DELIVERY_TIMEOUT_S = 10
SILENCE_S = 0.3  # how long a client is watched to show that nothing arrives


def notification(body: bytes) -> tuple[int, str, str]:
    """(pid, channel, payload) of a NotificationResponse body."""
    pid = int.from_bytes(body[:4], "big", signed=True)
    channel, payload, _ = body[4:].split(b"\0")
    return pid, channel.decode(), payload.decode()


async def notify(sender: RawClient, channel: str, payload: str) -> int:
    """NOTIFY from `sender` in one statement with pg_backend_pid(), so both run on the same
    server: the pid the notification must carry."""
    reply = await sender.query(f"SELECT pg_backend_pid() FROM pg_notify('{channel}', '{payload}')")
    assert error_fields(reply) is None, error_fields(reply)
    return int(data_rows(reply)[0][0])  # type: ignore[arg-type]


async def next_notification(client: RawClient) -> tuple[int, str, str]:
    msg_type, body = await client.next_message(DELIVERY_TIMEOUT_S)
    assert msg_type == c.B_NOTIFICATION_RESPONSE, (chr(msg_type), body)
    return notification(body)


async def nothing_arrives(client: RawClient) -> bool:
    try:
        message = await client.next_message(SILENCE_S)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message {message}")


def tags(messages: list[tuple[int, bytes]]) -> list[str]:
    return [body.rstrip(b"\0").decode() for t, body in messages if t == c.B_COMMAND_COMPLETE]


def channels(pooler: RunningPooler) -> set[bytes]:
    """The channels the pool's listener connection listens on (asked on the pooler's loop)."""

    def listening() -> set[bytes]:
        listener = pooler.pool().listener
        return set(listener.map.by_channel) if listener is not None else set()

    return pooler.call(listening)


async def show_listeners(pooler: RunningPooler) -> list[dict[str, str | None]]:
    admin = await RawClient.login(pooler.host, pooler.port, database="pgbouncer")
    try:
        messages = await admin.query("SHOW LISTENERS")
        assert error_fields(messages) is None
        names = [name for name, *_ in row_description(messages)]
        return [dict(zip(names, row, strict=True)) for row in data_rows(messages)]
    finally:
        await admin.close()


async def backends(postgres: EmbeddedPostgres) -> int:
    """Client backends on the test database (pypooler's servers; psql runs on another)."""
    out = await asyncio.to_thread(
        postgres.psql,
        "select count(*) from pg_stat_activity where datname = 'pypooler_test'"
        " and backend_type = 'client backend'",
    )
    return int(out)


# --------------------------------------------------------------------------- asyncpg


async def test_asyncpg_listeners_share_one_listener_connection(
    postgres: EmbeddedPostgres, start_pooler: Any
) -> None:
    pooler = start_pooler(pool_size=2)
    before = await backends(postgres)  # the pooler opens servers at its first login
    received: asyncio.Queue[tuple[int, int, str, object]] = asyncio.Queue()
    listeners = []
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        for number in range(50):
            conn = await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)
            listeners.append(conn)

            def callback(_: object, pid: int, channel: str, payload: object, number: int = number) -> None:
                received.put_nowait((number, pid, channel, payload))

            await conn.add_listener("news", callback)
        # A thousand listeners would cost the same: the pool's 2 servers and one listener.
        assert pooler.server_count() <= 2
        assert await backends(postgres) - before <= 3
        pid = await notify(sender, "news", "hello")
        seen = [await asyncio.wait_for(received.get(), DELIVERY_TIMEOUT_S) for _ in range(50)]
        assert sorted(number for number, *_ in seen) == list(range(50))
        assert {tuple(rest) for _, *rest in seen} == {(pid, "news", "hello")}
        # The listeners still run queries between notifications, on the pool's servers.
        assert await listeners[0].fetchval("SELECT 41 + 1") == 42
        (row,) = await show_listeners(pooler)
        assert (row["state"], row["channels"], row["listening_clients"]) == ("open", "1", "50")
        assert await backends(postgres) - before <= 3
    finally:
        for conn in listeners:
            await conn.close(timeout=CONNECT_TIMEOUT_S)
        await sender.close()


async def test_a_listener_that_leaves_and_the_last_one_unlistens(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)
    queues: list[asyncio.Queue[str]] = [asyncio.Queue() for _ in range(3)]
    conns = [await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S) for _ in range(3)]
    sender = await RawClient.login(pooler.host, pooler.port)
    callbacks = [lambda *args, queue=queue: queue.put_nowait(args[3]) for queue in queues]
    try:
        for conn, callback in zip(conns, callbacks, strict=True):
            await conn.add_listener("leaving", callback)
        await conns[0].close()
        await notify(sender, "leaving", "one")
        for queue in queues[1:]:
            assert await asyncio.wait_for(queue.get(), DELIVERY_TIMEOUT_S) == "one"
        assert channels(pooler) == {b"leaving"}
        await conns[1].remove_listener("leaving", callbacks[1])  # UNLISTEN "leaving"
        await notify(sender, "leaving", "two")
        assert await asyncio.wait_for(queues[2].get(), DELIVERY_TIMEOUT_S) == "two"
        await conns[2].close()
        # Nobody listens any more: the listener connection UNLISTENed the channel.
        await eventually(lambda: not channels(pooler))
        assert channels(pooler) == set()
        assert pooler.call(lambda: pooler.pool().listener._on_server) == set()
        (row,) = await show_listeners(pooler)
        assert (row["channels"], row["listening_clients"]) == ("0", "0")
        assert queues[1].empty()
    finally:
        for conn in conns:
            await conn.close(timeout=CONNECT_TIMEOUT_S)
        await sender.close()


async def test_an_asyncpg_pool_reset_unlistens(start_pooler: Any) -> None:
    """asyncpg's Pool resets a released connection with one Query of several statements,
    `UNLISTEN *` among them: the client's channels go too."""
    pooler = start_pooler(pool_size=2)
    pool = await asyncpg.create_pool(pooler.dsn(), min_size=1, max_size=1, timeout=CONNECT_TIMEOUT_S)
    try:
        async with pool.acquire() as conn:
            await conn.execute("LISTEN pooled")  # a simple Query (add_listener would remove_listener first)
            assert channels(pooler) == {b"pooled"}
            metrics = scrape(pooler.metrics_url)["pypooler_listen_channels"]
            assert sample(metrics, "pypooler_listen_channels", database="pypooler_test", user="postgres") == 1
        assert channels(pooler) == set()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT_S)


# --------------------------------------------------------------------------- the protocol


async def test_one_client_many_channels_unlisten_and_unlisten_all(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1)
    client = await RawClient.login(pooler.host, pooler.port)
    witness = await RawClient.login(pooler.host, pooler.port)
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        for sql in ("LISTEN alpha", 'LISTEN "Beta"', "listen GAMMA;", "/* c */ LISTEN delta -- d"):
            reply = await client.query(sql)
            assert tags(reply) == ["LISTEN"] and reply[-1] == (c.B_READY_FOR_QUERY, b"I"), reply
        assert tags(await witness.query("LISTEN alpha")) == ["LISTEN"]
        assert channels(pooler) == {b"alpha", b"Beta", b"gamma", b"delta"}
        for channel in ("alpha", "Beta", "gamma", "delta"):
            pid = await notify(sender, channel, f"to {channel}")
            assert await next_notification(client) == (pid, channel, f"to {channel}")
        assert (await next_notification(witness))[1:] == ("alpha", "to alpha")
        assert tags(await client.query("UNLISTEN alpha")) == ["UNLISTEN"]
        await notify(sender, "alpha", "after unlisten")
        assert (await next_notification(witness))[2] == "after unlisten"
        assert await nothing_arrives(client)
        assert channels(pooler) == {b"alpha", b"Beta", b"gamma", b"delta"}  # the witness listens
        assert tags(await client.query("UNLISTEN *")) == ["UNLISTEN"]
        assert channels(pooler) == {b"alpha"}
        for channel in ("Beta", "gamma", "delta", "alpha"):
            await notify(sender, channel, "nobody")
        assert (await next_notification(witness))[1] == "alpha"
        assert await nothing_arrives(client)
        # The client is a client like any other meanwhile.
        assert data_rows(await client.query("SELECT 'still here'")) == [["still here"]]
    finally:
        for raw in (client, witness, sender):
            await raw.close()


async def test_listen_needs_no_server(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, query_wait_timeout=30)
    holder = await RawClient.login(pooler.host, pooler.port)
    client = await RawClient.login(pooler.host, pooler.port)
    try:
        await holder.query("BEGIN")  # holds the pool's only server
        reply = await client.query("LISTEN while_busy")
        assert tags(reply) == ["LISTEN"]
        assert tags(await client.query("UNLISTEN while_busy")) == ["UNLISTEN"]
        assert pooler.call(lambda: pooler.pool().waiting) == 0
    finally:
        await holder.query("ROLLBACK")
        await holder.close()
        await client.close()


async def test_a_client_holding_a_server_gets_at_most_1024_waiting_notifications(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)
    client = await RawClient.login(pooler.host, pooler.port)
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        await client.query("LISTEN many")
        await client.query("BEGIN")
        await client.query("SELECT 1")
        reply = await sender.query("SELECT count(pg_notify('many', i::text)) FROM generate_series(1, 1100) i")
        assert data_rows(reply) == [["1100"]]
        for _ in range(100):  # until the listener connection has passed them all on
            (row,) = await show_listeners(pooler)
            if row["delivered"] == "1100":
                break
            await asyncio.sleep(0.05)
        assert (row["delivered"], row["dropped"]) == ("1100", "76")
        assert await nothing_arrives(client)
        await client.query("COMMIT")
        payloads = [(await next_notification(client))[2] for _ in range(1024)]
        assert payloads == [str(i) for i in range(77, 1101)]  # the oldest were dropped
        assert await nothing_arrives(client)
    finally:
        await client.close()
        await sender.close()


@pytest.mark.parametrize("mode", ["transaction", "statement"])
async def test_extended_protocol_listen(start_pooler: Any, mode: str) -> None:
    pooler = start_pooler(pool_size=1, pool_mode=mode)
    client = await RawClient.login(pooler.host, pooler.port)
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        # Parse, Bind, Describe portal, Execute, Sync of the unnamed statement (libpq, JDBC).
        client.send(extended("LISTEN ext"))
        reply = await client.until_ready()
        assert [chr(t) for t, _ in reply] == ["1", "2", "n", "C", "Z"]
        assert tags(reply) == ["LISTEN"]
        pid = await notify(sender, "ext", "extended")
        assert await next_notification(client) == (pid, "ext", "extended")
    finally:
        await client.close()
        await sender.close()


async def test_listen_in_a_transaction_block_takes_effect_at_commit(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)
    client = await RawClient.login(pooler.host, pooler.port)
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        await client.query("BEGIN")
        reply = await client.query("LISTEN committed")
        assert tags(reply) == ["LISTEN"] and reply[-1] == (c.B_READY_FOR_QUERY, b"T")
        await notify(sender, "committed", "too early")
        assert await nothing_arrives(client)
        assert tags(await client.query("COMMIT")) == ["COMMIT"]
        pid = await notify(sender, "committed", "listened")
        assert await next_notification(client) == (pid, "committed", "listened")
        # Rolled back: never listened.
        await client.query("BEGIN")
        await client.query("LISTEN rolled_back")
        await client.query("ROLLBACK")
        await notify(sender, "rolled_back", "never")
        assert await nothing_arrives(client)
        assert b"rolled_back" not in channels(pooler)
        # In a failed block: refused as PostgreSQL refuses any statement there.
        await client.query("BEGIN")
        await client.query("SELECT 1/0")
        reply = await client.query("LISTEN failed")
        fields = error_fields(reply)
        assert fields is not None and fields["C"] == "25P02"
        assert reply[-1] == (c.B_READY_FOR_QUERY, b"E")
        await client.query("ROLLBACK")
        # A notification that comes while the client holds a server waits for its transaction.
        await client.query("BEGIN")
        await client.query("SELECT 1")
        pid = await notify(sender, "committed", "held")
        assert await nothing_arrives(client)
        reply = await client.query("COMMIT")
        assert reply[-1] == (c.B_READY_FOR_QUERY, b"I")
        assert await next_notification(client) == (pid, "committed", "held")
    finally:
        await client.query("ROLLBACK")
        await client.close()
        await sender.close()


async def test_notify_in_a_transaction_arrives_after_commit_never_after_rollback(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=2)
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)
    sender = await asyncpg.connect(pooler.dsn(), timeout=CONNECT_TIMEOUT_S)
    try:
        await listener.add_listener("xact", lambda *args: received.put_nowait(args[3]))
        async with sender.transaction():
            await sender.execute("NOTIFY xact, 'committed'")
            await asyncio.sleep(SILENCE_S)
            assert received.empty()
        assert await asyncio.wait_for(received.get(), DELIVERY_TIMEOUT_S) == "committed"
        with contextlib.suppress(RuntimeError):
            async with sender.transaction():
                await sender.execute("NOTIFY xact, 'rolled back'")
                raise RuntimeError("roll back")
        await sender.execute("NOTIFY xact, 'after'")
        assert await asyncio.wait_for(received.get(), DELIVERY_TIMEOUT_S) == "after"
        assert received.empty()
    finally:
        await listener.close(timeout=CONNECT_TIMEOUT_S)
        await sender.close(timeout=CONNECT_TIMEOUT_S)


# --------------------------------------------------------------------------- psycopg


@pytest.mark.parametrize(
    ("binary", "autocommit"), [(False, True), (True, True), (False, False)],
    ids=["simple", "extended", "committed"],
)  # fmt: skip
async def test_psycopg_notifies(start_pooler: Any, binary: bool, autocommit: bool) -> None:
    pooler = start_pooler(pool_size=1)
    conn = await psycopg.AsyncConnection.connect(pooler.dsn(), autocommit=autocommit)
    sender = await psycopg.AsyncConnection.connect(pooler.dsn(), autocommit=True)
    try:
        # binary=True makes psycopg use the extended protocol (Parse/Bind/Describe/Execute/Sync);
        # without autocommit psycopg sends BEGIN first, and the LISTEN takes effect at COMMIT.
        cursor = await conn.execute("LISTEN psy", binary=binary)
        assert cursor.statusmessage == "LISTEN"
        if not autocommit:
            await conn.commit()
        row = await (await sender.execute("SELECT pg_backend_pid() FROM pg_notify('psy', 'one')")).fetchone()
        await sender.execute("NOTIFY psy, 'two'")
        assert row is not None
        seen = []
        async with asyncio.timeout(DELIVERY_TIMEOUT_S):
            async for notify_ in conn.notifies(stop_after=2):
                seen.append((notify_.pid, notify_.channel, notify_.payload))
        assert seen[0] == (row[0], "psy", "one")
        assert seen[1][1:] == ("psy", "two")
    finally:
        await conn.close()
        await sender.close()


# --------------------------------------------------------------------------- failures


async def test_the_listener_connection_is_reopened_and_listens_again(
    postgres: EmbeddedPostgres, start_pooler: Any
) -> None:
    pooler = start_pooler(pool_size=1)
    client = await RawClient.login(pooler.host, pooler.port)
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        await client.query("LISTEN survivor")
        (row,) = await show_listeners(pooler)
        old_pid = row["server_pid"]
        await asyncio.to_thread(postgres.psql, f"select pg_terminate_backend({old_pid})")
        for _ in range(200):
            (row,) = await show_listeners(pooler)
            if row["state"] == "open" and row["server_pid"] != old_pid:
                break
            await asyncio.sleep(0.05)
        assert row["state"] == "open" and row["server_pid"] != old_pid and row["reconnects"] == "1"
        pid = await notify(sender, "survivor", "again")
        assert await next_notification(client) == (pid, "survivor", "again")
    finally:
        await client.close()
        await sender.close()


async def test_a_listen_the_listener_connection_cannot_serve_fails(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, server_connect_timeout=5)
    client = await RawClient.login(pooler.host, pooler.port)
    try:
        assert data_rows(await client.query("SELECT 1")) == [["1"]]  # the pool has its server
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        pooler.call(lambda: setattr(pooler.pool().login, "port", closed_port))
        reply = await client.query("LISTEN nowhere")
        fields = error_fields(reply)
        assert fields is not None and fields["C"] == "08001" and "listener connection" in fields["M"]
        assert reply[-1] == (c.B_READY_FOR_QUERY, b"I")
        assert channels(pooler) == set()
        assert data_rows(await client.query("SELECT 2")) == [["2"]]  # on the pool's server
    finally:
        await client.close()


async def test_the_listener_connection_closes_when_idle_and_opens_again(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, server_idle_timeout=0.5)
    client = await RawClient.login(pooler.host, pooler.port)
    sender = await RawClient.login(pooler.host, pooler.port)
    try:
        await client.query("LISTEN idle")
        await client.query("UNLISTEN idle")
        for _ in range(200):
            (row,) = await show_listeners(pooler)
            if row["state"] == "closed":
                break
            await asyncio.sleep(0.05)
        assert row["state"] == "closed"
        assert tags(await client.query("LISTEN idle")) == ["LISTEN"]
        (row,) = await show_listeners(pooler)
        assert row["state"] == "open"
        pid = await notify(sender, "idle", "back")
        assert await next_notification(client) == (pid, "idle", "back")
    finally:
        await client.close()
        await sender.close()


async def test_listen_mode_session_state_sends_listen_to_the_server(start_pooler: Any) -> None:
    pooler = start_pooler(pool_size=1, listen_mode="session_state")
    client = await RawClient.login(pooler.host, pooler.port)
    try:
        await client.query("LISTEN old_way")
        assert data_rows(await client.query("SELECT pg_listening_channels()")) == [["old_way"]]
        assert pooler.call(lambda: pooler.pool().listener) is None
    finally:
        await client.query("UNLISTEN *")
        await client.close()
