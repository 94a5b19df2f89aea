"""The real @neondatabase/serverless driver (tests/node/package.json pins it) against pypooler's
HTTP listener: neon() queries with parameters of the common types, full results, a transaction
with isolation level and read-only, and errors with their codes; then Pool and Client over a
WebSocket (neon_ws.mjs), with the driver's pipelined login (cleartext password) and without it.

Skipped until pypooler.http_listener exists, and when npm cannot install the driver (the
`neon_driver` fixture, tests/support/neon_driver.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.neon_driver import run_neon, run_neon_ws
from tests.support.poolers import RunningPooler

pytest.importorskip(
    "pypooler.http_listener", reason="the HTTP listener (issue 18, http-ws) is not merged yet"
)


@pytest.fixture
def http_pooler(start_pooler: Callable[..., RunningPooler]) -> RunningPooler:
    return start_pooler(pool_size=2, http_listen_addr="127.0.0.1", http_listen_port=0)


def test_neon_queries_with_parameters(neon_driver: Path, http_pooler: RunningPooler) -> None:
    (row,) = run_neon(neon_driver, http_pooler, "params")["ok"]
    assert row["n"] == 7 and row["t"] == "hé" and row["b"] is True and row["z"] is None
    assert row["d"] == "2024-01-02T03:04:05.000Z"
    assert row["a"] == [1, 2] and row["j"] == {"k": 1}


def test_neon_full_results(neon_driver: Path, http_pooler: RunningPooler) -> None:
    result = run_neon(neon_driver, http_pooler, "full")["ok"]
    assert result["command"] == "SELECT" and result["rowCount"] == 1
    assert result["rows"] == [["9007199254740993"]]
    assert result["fields"][0]["dataTypeID"] == 20


def test_neon_transaction_with_isolation_and_read_only(neon_driver: Path, http_pooler: RunningPooler) -> None:
    results = run_neon(neon_driver, http_pooler, "transaction")["ok"]
    assert results == [[{"i": "repeatable read"}], [{"r": "on"}]]


def test_neon_errors_carry_their_code(neon_driver: Path, http_pooler: RunningPooler) -> None:
    error = run_neon(neon_driver, http_pooler, "error")["error"]
    assert (
        error["name"] == "NeonDbError" and error["code"] == "22012" and error["message"] == "division by zero"
    )


def test_neon_wrong_password(
    neon_driver: Path, start_pooler: Callable[..., RunningPooler], tmp_path: Path
) -> None:
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text('"postgres" "right"\n')
    running = start_pooler(
        pool_size=1,
        auth_type="scram-sha-256",
        auth_file=str(auth_file),
        http_listen_addr="127.0.0.1",
        http_listen_port=0,
    )
    error = run_neon(neon_driver, running, "badpassword", password="wrong")["error"]
    assert error["code"] == "28P01"


def test_ws_pool_query_with_parameters(neon_driver: Path, http_pooler: RunningPooler) -> None:
    assert run_neon_ws(neon_driver, http_pooler, "params")["ok"] == [{"n": 42, "t": "hé"}]


def test_ws_client_transaction(neon_driver: Path, http_pooler: RunningPooler) -> None:
    assert run_neon_ws(neon_driver, http_pooler, "transaction")["ok"] == [{"s": 3, "x": True}]


def test_ws_error_carries_its_code(neon_driver: Path, http_pooler: RunningPooler) -> None:
    error = run_neon_ws(neon_driver, http_pooler, "error")["error"]
    assert error["code"] == "22012" and error["message"] == "division by zero"


@pytest.fixture
def plain_pooler(start_pooler: Callable[..., RunningPooler], tmp_path: Path) -> RunningPooler:
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text('"postgres" "right"\n')
    return start_pooler(
        pool_size=2, auth_type="plain", auth_file=str(auth_file),
        http_listen_addr="127.0.0.1", http_listen_port=0,
    )  # fmt: skip


def test_ws_pipelined_login_with_cleartext_password(neon_driver: Path, plain_pooler: RunningPooler) -> None:
    """The driver's default pipelineConnect = "password": startup and password in one go."""
    result = run_neon_ws(neon_driver, plain_pooler, "params", pipeline="password", password="right")
    assert result["ok"] == [{"n": 42, "t": "hé"}]


def test_ws_pipelined_login_wrong_password(neon_driver: Path, plain_pooler: RunningPooler) -> None:
    error = run_neon_ws(neon_driver, plain_pooler, "params", pipeline="password", password="wrong")["error"]
    assert error["code"] == "28P01"


def test_ws_pipelined_login_needs_cleartext_auth(neon_driver: Path, http_pooler: RunningPooler) -> None:
    """With trust the driver's pipelined PasswordMessage arrives after the welcome: a protocol
    error, as PostgreSQL's (pipelineConnect = false is the setting for trust, md5 and SCRAM)."""
    error = run_neon_ws(neon_driver, http_pooler, "params", pipeline="password")["error"]
    assert error["code"] == "08P01" and "112" in error["message"]
