"""The real @neondatabase/serverless driver, run by node: tests/node/package.json pins it (and
pg-copy-streams), npm installs them once per checkout, and each script prints one JSON line,
`{"ok": result}` or `{"error": {message, code, ...}}`.

Every node run is bounded by NODE_TIMEOUT_S; the install by NPM_TIMEOUT_S. Without node and npm,
or when npm cannot install, the tests that need the driver are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.poolers import RunningPooler

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
NPM_TIMEOUT_S = 300
NODE_TIMEOUT_S = 30
# Node 20's WebSocket is behind a flag (undici's, global from Node 22).
NODE_WEBSOCKET = ("--experimental-websocket", "--no-warnings")


def neon_driver_installed() -> Path:
    """tests/node with every package of its package.json installed (kept between runs)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run the driver")
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not all((NODE_DIR / "node_modules" / name / "package.json").is_file() for name in wanted):
        try:
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR, check=True, capture_output=True, timeout=NPM_TIMEOUT_S,
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"npm could not install the driver's packages: {exc}")
    return NODE_DIR


def http_port(running: RunningPooler) -> int:
    port = getattr(running.pooler, "http_port", None)
    if not isinstance(port, int) or not port:
        pytest.skip("the pooler reports no HTTP port (Pooler.http_port)")
    return port


def connection_string(user: str = "postgres", password: str = "x", database: str = "pypooler_test") -> str:
    return f"postgresql://{user}:{password}@127.0.0.1/{database}"


def run_node(driver: Path, *args: str, ca_file: str | None = None) -> Any:
    """Run a script of tests/node; its last line of output, parsed. `ca_file`: a CA node trusts
    besides its own (NODE_EXTRA_CA_CERTS), so TLS is verified, not switched off."""
    env = dict(os.environ)
    if ca_file is not None:
        env["NODE_EXTRA_CA_CERTS"] = ca_file
    done = subprocess.run(
        ["node", *args], cwd=driver, env=env, capture_output=True, text=True,
        timeout=NODE_TIMEOUT_S, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_neon(
    driver: Path, running: RunningPooler, case: str, *, scheme: str = "http", host: str = "127.0.0.1",
    ca_file: str | None = None, **login: str,
) -> Any:  # fmt: skip
    """neon_http.mjs: neon() against the listener's POST /sql."""
    endpoint = f"{scheme}://{host}:{http_port(running)}/sql"
    return run_node(driver, "neon_http.mjs", endpoint, connection_string(**login), case, ca_file=ca_file)


def run_neon_ws(
    driver: Path, running: RunningPooler, case: str, *extra: str, pipeline: str = "false",
    scheme: str = "ws", host: str = "127.0.0.1", ca_file: str | None = None, **login: str,
) -> Any:  # fmt: skip
    """neon_ws.mjs: the driver's Pool/Client over a WebSocket (`scheme` ws or wss)."""
    url = f"{scheme}://{host}:{http_port(running)}"
    return run_node(
        driver, *NODE_WEBSOCKET, "neon_ws.mjs", url, connection_string(**login), pipeline, case, *extra,
        ca_file=ca_file,
    )  # fmt: skip
