"""The real driver over TLS: with client TLS configured the HTTP listener speaks HTTPS only, and the
driver reaches it with `useSecureWebSocket` (wss://) and an https fetchEndpoint, trusting the
test CA (tests/support/tlscerts.py) through NODE_EXTRA_CA_CERTS, the certificate verified.

A plain ws:// or http:// request to that port fails its handshake: pypooler closes the socket
without a reply (no HTTP answer can be sent before TLS), the driver reports a network error, and
nothing else is touched. hba: a WebSocket client over wss:// matches `hostssl` lines, one over
ws:// `hostnossl` lines, and both `host` lines.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.neon_driver import http_port, run_neon, run_neon_ws
from tests.support.poolers import RunningPooler
from tests.support.tlscerts import CertificateAuthority, make_ca
from tests.support.waiting import wait_until

SOCKET_TIMEOUT_S = 10
WEBSOCKET_UPGRADE = (
    b"GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# Three rules for the two databases: by TLS for pypooler_test, for anyone on postgres.
HBA = (
    "hostssl pypooler_test postgres 127.0.0.1/32 trust\n"
    "hostnossl pypooler_test pp_trust 127.0.0.1/32 trust\n"
    "host postgres all 127.0.0.1/32 trust\n"
)


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca: CertificateAuthority = make_ca(directory)
        self.server_cert, self.server_key = self.ca.issue("server", "localhost", server=True)

    def settings(self, **more: Any) -> dict[str, Any]:
        """A pooler whose clients (TCP, HTTP and WebSocket) must use TLS."""
        return {
            "client_tls_sslmode": "require",
            "client_tls_cert_file": self.server_cert,
            "client_tls_key_file": self.server_key,
            "http_listen_addr": "127.0.0.1",
            "http_listen_port": 0,
            **more,
        }


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("driver-tls"))


@pytest.fixture(scope="module")
def tls_pooler(start_module_pooler: Callable[..., RunningPooler], certs: Certs) -> RunningPooler:
    return start_module_pooler(pool_size=2, **certs.settings())


def test_neon_over_https(neon_driver: Path, tls_pooler: RunningPooler, certs: Certs) -> None:
    (row,) = run_neon(neon_driver, tls_pooler, "params", scheme="https", ca_file=certs.ca.ca_cert)["ok"]
    assert row["n"] == 7 and row["t"] == "hé"


def test_client_over_wss(neon_driver: Path, tls_pooler: RunningPooler, certs: Certs) -> None:
    """client_tls_sslmode = require admits it: the WebSocket is TLS."""
    for host in ("localhost", "127.0.0.1"):  # the certificate names both
        result = run_neon_ws(
            neon_driver, tls_pooler, "transaction", scheme="wss", host=host, ca_file=certs.ca.ca_cert
        )
        assert result["ok"] == [{"s": 3, "x": True}]


def test_the_certificate_is_verified(neon_driver: Path, tls_pooler: RunningPooler) -> None:
    """Without the test CA node refuses pypooler's certificate: the tests above do verify it."""
    assert "fetch failed" in run_neon(neon_driver, tls_pooler, "params", scheme="https")["error"]["message"]
    refused = run_neon_ws(neon_driver, tls_pooler, "params", scheme="wss")["error"]
    assert "network error" in refused["message"]


def plain_http_reply(port: int, request: bytes) -> bytes:
    """Send a request in clear to the TLS port; what comes back until pypooler closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
        return reply


def test_plain_ws_and_http_to_the_tls_port_fail_cleanly(
    neon_driver: Path, tls_pooler: RunningPooler, certs: Certs
) -> None:
    errors: list[str] = []
    tls_pooler.call(
        lambda: tls_pooler.loop.set_exception_handler(lambda loop, context: errors.append(str(context)))
    )
    try:
        http = run_neon(neon_driver, tls_pooler, "params", scheme="http")["error"]
        assert http["name"] == "NeonDbError" and "fetch failed" in http["message"]
        ws = run_neon_ws(neon_driver, tls_pooler, "params", scheme="ws")["error"]
        assert ws["message"] == "Received network error or non-101 status code."
        # At the socket: the TLS handshake fails on the request line, and the socket is closed
        # without an HTTP answer.
        port = http_port(tls_pooler)
        assert b"HTTP/" not in plain_http_reply(port, WEBSOCKET_UPGRADE)
        assert b"HTTP/" not in plain_http_reply(
            port, b"POST /sql HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        )
        # Nothing was left behind, and TLS clients go on.
        wait_until(lambda: tls_pooler.call(lambda: not tls_pooler.pooler.registry.clients), timeout=5)
        result = run_neon_ws(neon_driver, tls_pooler, "params", scheme="wss", ca_file=certs.ca.ca_cert)
        assert result["ok"] == [{"n": 42, "t": "hé"}]
    finally:
        tls_pooler.call(lambda: tls_pooler.loop.set_exception_handler(None))
    assert errors == []


@pytest.fixture
def hba_file(tmp_path: Path) -> str:
    path = tmp_path / "hba.conf"
    path.write_text(HBA)
    return str(path)


def hba_answers(driver: Path, pooler: RunningPooler, **over: str) -> dict[tuple[str, str], str]:
    """For each (user, database): "ok", or the login error's SQLSTATE and message."""
    answers = {}
    for user, database in (
        ("postgres", "pypooler_test"),
        ("pp_trust", "pypooler_test"),
        ("pp_trust", "postgres"),
    ):
        result = run_neon_ws(driver, pooler, "params", user=user, database=database, **over)
        answers[user, database] = (
            "ok" if "ok" in result else f"{result['error']['code']} {result['error']['message']}"
        )
    return answers


def test_hostssl_lines_match_wss_clients(
    neon_driver: Path, start_pooler: Callable[..., RunningPooler], certs: Certs, hba_file: str
) -> None:
    pooler = start_pooler(pool_size=1, **certs.settings(auth_type="hba", auth_hba_file=hba_file))
    assert hba_answers(neon_driver, pooler, scheme="wss", ca_file=certs.ca.ca_cert) == {
        ("postgres", "pypooler_test"): "ok",
        ("pp_trust", "pypooler_test"): '28000 no pg_hba.conf entry for host "127.0.0.1", user "pp_trust",'
        ' database "pypooler_test", SSL encryption',
        ("pp_trust", "postgres"): "ok",
    }


def test_hostnossl_lines_match_ws_clients(
    neon_driver: Path, start_pooler: Callable[..., RunningPooler], hba_file: str
) -> None:
    pooler = start_pooler(
        pool_size=1, auth_type="hba", auth_hba_file=hba_file, http_listen_addr="127.0.0.1", http_listen_port=0
    )
    assert hba_answers(neon_driver, pooler, scheme="ws") == {
        ("postgres", "pypooler_test"): '28000 no pg_hba.conf entry for host "127.0.0.1", user "postgres",'
        ' database "pypooler_test", no encryption',
        ("pp_trust", "pypooler_test"): "ok",
        ("pp_trust", "postgres"): "ok",
    }
