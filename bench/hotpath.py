"""Python cost of the proxy per transaction and per login, without sockets or kernel noise.

Drives real ClientConnection / ServerConnection / Pool objects through the unit tests' fake
transports (tests/support/transports.py): a pgbench -S style transaction (Query in,
RowDescription/DataRow/CommandComplete/ReadyForQuery out) and a full client login + Terminate.
Prints the best-of-N µs per operation, so a change to the hot path can be measured before and
after on a busy machine:

    .venv/bin/python -m bench.hotpath
"""

from __future__ import annotations

import random
import statistics
import time

import uvloop

from pypooler.protocol import codec
from pypooler.protocol import constants as c
from tests.support.transports import FakeTransport, pool_with_one_server

QUERY = codec.build_query("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;")
REPLY = (
    codec.build_row_description([("abalance", 23)])
    + codec.build_data_row(["0"])
    + codec.build_command_complete("SELECT 1")
    + codec.build_ready_for_query()
)
STARTUP = codec.build_startup_message({"user": "bench", "database": "bench", "application_name": "pgbench"})
ROUNDS = 7


def best_us(samples: list[float]) -> str:
    return f"{min(samples):6.2f} µs (median {statistics.median(samples):.2f})"


async def main() -> None:
    # As a server that a pgbench client already gave its application_name (the steady state:
    # no settings to send at a lend). The fake transports count what they are sent, keep none.
    pooler, pool, server = pool_with_one_server("bench", "bench", "pgbench", keep=False)

    from pypooler.client import ClientConnection

    client = ClientConnection(pooler.registry)
    client.connection_made(FakeTransport(keep=False))
    client.data_received(STARTUP)
    assert client.logged_in

    n = 50_000
    # Like pgbench: a random literal per query, so statement texts rarely repeat.
    queries = [
        codec.build_query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
        for aid in random.Random(1).sample(range(1, 1_000_000), n)
    ]
    xact: list[float] = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for query in queries:
            client.data_received(query)
            server.data_received(REPLY)
        xact.append((time.perf_counter_ns() - start) / n / 1000)
    assert client.server is None and pool.idle == [server]

    # Under load (pgbench c >= 100 on a pool of 20) nearly every transaction waits: the second
    # client queues, and the first one's release hands the server over to it.
    second = ClientConnection(pooler.registry)
    second.connection_made(FakeTransport(keep=False))
    second.data_received(STARTUP)
    handoff: list[float] = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for i in range(0, n, 2):
            client.data_received(queries[i])
            second.data_received(queries[i + 1])
            server.data_received(REPLY)  # client's answer: the server goes to `second`
            server.data_received(REPLY)
        handoff.append((time.perf_counter_ns() - start) / n / 1000)
    assert client.server is None and second.server is None and pool.idle == [server]

    # TPC-B-like: BEGIN, five statements, END, each its own round trip inside one hold.
    in_xact = codec.build_ready_for_query(c.TX_IN_TRANSACTION)
    begin_reply = codec.build_command_complete("BEGIN") + in_xact
    statement_reply = codec.build_command_complete("UPDATE 1") + in_xact
    end_reply = codec.build_command_complete("COMMIT") + codec.build_ready_for_query()
    statements = [
        codec.build_query(f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};")
        for delta, aid in zip(
            range(-5000, 5000), random.Random(2).sample(range(1, 1_000_000), 10_000), strict=True
        )
    ]
    begin, end = codec.build_query("BEGIN;"), codec.build_query("END;")
    k = 10_000
    tpcb: list[float] = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for i in range(k):
            client.data_received(begin)
            server.data_received(begin_reply)
            for j in range(5):
                client.data_received(statements[(i + j) % len(statements)])
                server.data_received(statement_reply)
            client.data_received(end)
            server.data_received(end_reply)
        tpcb.append((time.perf_counter_ns() - start) / k / 1000)
    assert client.server is None

    m = 5_000
    login: list[float] = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(m):
            other = ClientConnection(pooler.registry)
            transport = FakeTransport(keep=False)
            other.connection_made(transport)
            other.data_received(STARTUP)
            other.data_received(QUERY)
            server.data_received(REPLY)
            other.data_received(codec.TERMINATE)
            other.connection_lost(None)
        login.append((time.perf_counter_ns() - start) / m / 1000)
    print(f"transaction (Query -> 4 messages -> release): {best_us(xact)}  (random literals, like pgbench)")
    print(f"the same, each one handed over to a waiter:   {best_us(handoff)}")
    print(f"TPC-B-like (7 round trips in one hold):       {best_us(tpcb)}")
    print(f"connect + login + 1 transaction + Terminate:   {best_us(login)}")


if __name__ == "__main__":
    uvloop.run(main())
