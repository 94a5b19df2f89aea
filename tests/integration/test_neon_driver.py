"""The real @neondatabase/serverless driver (tests/node/package.json pins it) against pypooler's
HTTP listener: neon() queries with parameters of the common types, full results, a transaction
with isolation level and read-only, and errors with their codes; then Pool and Client over a
WebSocket (neon_ws.mjs), with the driver's pipelined login (cleartext password) and without it.

Skipped until pypooler.http_listener exists, and when npm cannot install the driver.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.poolers import RunningPooler

pytest.importorskip(
    "pypooler.http_listener", reason="the HTTP listener (issue 18, http-ws) is not merged yet"
)

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
NPM_TIMEOUT_S = 300
NODE_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def neon_driver() -> Iterator[Path]:
    """tests/node with the driver installed (once; kept between runs)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run the driver")
    if not (NODE_DIR / "node_modules" / "@neondatabase" / "serverless").is_dir():
        try:
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                check=True,
                capture_output=True,
                timeout=NPM_TIMEOUT_S,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"npm could not install @neondatabase/serverless: {exc}")
    yield NODE_DIR


def http_port(running: RunningPooler) -> int:
    port = getattr(running.pooler, "http_port", None)
    if not isinstance(port, int) or not port:
        pytest.skip("the pooler reports no HTTP port (Pooler.http_port)")
    return port


def run_neon(
    driver: Path, running: RunningPooler, case: str, *, user: str = "postgres", password: str = "x"
) -> Any:
    endpoint = f"http://127.0.0.1:{http_port(running)}/sql"
    connection_string = f"postgresql://{user}:{password}@127.0.0.1/pypooler_test"
    done = subprocess.run(
        ["node", str(driver / "neon_http.mjs"), endpoint, connection_string, case],
        cwd=driver,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def run_neon_ws(
    driver: Path,
    running: RunningPooler,
    case: str,
    *,
    pipeline: str = "false",
    user: str = "postgres",
    password: str = "x",
) -> Any:
    connection_string = f"postgresql://{user}:{password}@127.0.0.1/pypooler_test"
    done = subprocess.run(
        # Node 20's WebSocket is behind a flag (undici's, global from Node 22).
        ["node", "--experimental-websocket", "--no-warnings", str(driver / "neon_ws.mjs"),
         f"127.0.0.1:{http_port(running)}", connection_string, pipeline, case],
        cwd=driver, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


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
