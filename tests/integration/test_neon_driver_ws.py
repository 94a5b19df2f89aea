"""The real driver's Client and Pool over a WebSocket through pypooler (tests/node/neon_ws.mjs),
beyond test_neon_driver's basics: node-postgres named statements in transaction mode (reused
across transactions and servers, with errors), checked against the same calls in session mode;
COPY in (pg-copy-streams) and out, with COPYs that fail; a client gone mid-transaction.

One transaction-mode and one session-mode pooler serve the whole module: each test leaves them
with no client and no server lent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pypooler.embedded import EmbeddedPostgres
from tests.support.neon_driver import run_neon_ws
from tests.support.poolers import RunningPooler
from tests.support.waiting import wait_until

TABLE = "ws_driver_rows"


@pytest.fixture(scope="module")
def transaction_pooler(start_module_pooler: Callable[..., RunningPooler]) -> RunningPooler:
    return start_module_pooler(pool_size=2, http_listen_addr="127.0.0.1", http_listen_port=0)


@pytest.fixture(scope="module")
def session_pooler(start_module_pooler: Callable[..., RunningPooler]) -> RunningPooler:
    # The prepared case holds four connections at once: two Clients and a Pool of two.
    return start_module_pooler(
        pool_size=4, pool_mode="session", http_listen_addr="127.0.0.1", http_listen_port=0
    )


@pytest.fixture
def table(postgres: EmbeddedPostgres) -> Iterator[str]:
    postgres.psql(f"CREATE TABLE {TABLE} (n int, t text)")
    yield TABLE
    postgres.psql(f"DROP TABLE {TABLE}")


def wait_until_at_rest(pooler: RunningPooler) -> None:
    """No client left and no server lent: what each test owes the next."""

    def at_rest() -> bool:
        registry = pooler.pooler.registry
        return not registry.clients and all(pool.lent == 0 for pool in pooler.pooler.manager.pools.values())

    wait_until(lambda: pooler.call(at_rest), timeout=5, what="a client or a lent server was left behind")


def test_named_statements_across_transactions_and_servers(
    neon_driver: Path, transaction_pooler: RunningPooler, session_pooler: RunningPooler
) -> None:
    pooled = run_neon_ws(neon_driver, transaction_pooler, "prepared")["ok"]
    held = run_neon_ws(neon_driver, session_pooler, "prepared")["ok"]

    # Each client's statement ran on both servers in transaction mode, on its own in session mode.
    assert pooled.pop("servers") == {"a": 2, "b": 2}
    assert held.pop("servers") == {"a": 1, "b": 1}
    assert pooled == held
    # What PostgreSQL answers: the same name is a different statement for each client, and a
    # statement whose execution failed stays prepared.
    assert pooled["values"] == {"a": [0, 2, 4], "b": ["0!", "1!", "2!", "after!"]}
    assert pooled["poolRows"] == [101, 102, 103, 104, 105, 106]
    codes = {case: answer.get("error", {}).get("code") for case, answer in pooled["errors"].items()}
    assert codes == {
        "executeFails": "22012", "sameStatementAgain": None, "parseFails": "42601",
        "inTransaction": "22012", "afterFailure": "25P02",
    }  # fmt: skip
    assert pooled["errors"]["sameStatementAgain"]["ok"] == [{"r": 2}]
    wait_until_at_rest(transaction_pooler)
    wait_until_at_rest(session_pooler)


def test_copy_in_and_out_in_transaction_mode(
    neon_driver: Path, transaction_pooler: RunningPooler, table: str, postgres: EmbeddedPostgres
) -> None:
    result = run_neon_ws(neon_driver, transaction_pooler, "copy", table)["ok"]

    assert result["in"] == 3
    assert result["out"] == {"command": "COPY 3", "data": "1\tone\n2\ttwo\n3\t\\N\n"}
    # A row PostgreSQL refuses midway, a COPY the client abandons (CopyFail), one refused at once:
    # each an error for that COPY alone, nothing of it kept, and the connection goes on.
    assert result["badRow"]["error"]["code"] == "22P02"
    assert result["abandoned"]["error"] == {
        "code": "57014", "message": "COPY from stdin failed: the client gave up"
    }  # fmt: skip
    assert result["outRefused"]["error"]["code"] == "42P01"
    assert result["afterBadRow"] == result["afterAbandoned"] == result["afterRollback"] == 3
    assert postgres.psql(f"SELECT string_agg(n::text, ',' ORDER BY n) FROM {table}") == "1,2,3"
    wait_until_at_rest(transaction_pooler)


def test_a_client_gone_mid_transaction_leaves_its_server_clean(
    neon_driver: Path, transaction_pooler: RunningPooler, table: str, postgres: EmbeddedPostgres
) -> None:
    assert run_neon_ws(neon_driver, transaction_pooler, "abandon", table)["ok"] == "inserted"

    wait_until_at_rest(transaction_pooler)
    # pypooler closes a server left in a transaction (its backend rolls back as it ends).
    in_transaction = "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
    wait_until(
        lambda: postgres.psql(in_transaction) == "0", timeout=5, what="a backend stayed in its transaction"
    )
    assert postgres.psql(f"SELECT count(*) FROM {table}") == "0"
    # Both servers of the pool are there for the next clients.
    assert run_neon_ws(neon_driver, transaction_pooler, "transaction")["ok"] == [{"s": 3, "x": True}]
    wait_until_at_rest(transaction_pooler)
