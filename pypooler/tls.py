"""TLS contexts for both sides of the proxy, built once from the settings.

Client side (`ClientTls`): pypooler is the TLS server. Its certificate's tls-server-end-point hash is
computed here once, because every SCRAM-SHA-256-PLUS login over TLS needs it. Client certificates
are required for verify-ca / verify-full, and optional (checked only when presented) when a CA
file is given, so hba `cert` lines can still demand one.

Server side (`server_ssl_context`): pypooler is the TLS client; prefer/require encrypt without
checking the certificate, verify-ca checks the chain, verify-full the chain and the host name.

Rules: TLS 1.2 or newer everywhere; any problem loading a file is a `ConfigError` naming the
setting, so `pypooler check-config` reports it before anything listens.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pypooler.config import TLS_REQUIRED_MODES, ClientTlsMode, ConfigError, ServerTlsMode, Settings
from pypooler.protocol.scram import certificate_hash

__all__ = ["ClientTls", "client_tls", "peer_common_name", "server_ssl_context"]


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What the client listener needs to offer TLS."""

    mode: ClientTlsMode
    context: ssl.SSLContext
    # tls-server-end-point channel-binding data for SCRAM-SHA-256-PLUS.
    channel_binding: bytes

    @property
    def required(self) -> bool:
        return self.mode in TLS_REQUIRED_MODES


def client_tls(settings: Settings) -> ClientTls | None:
    """The client-side TLS setup, or None when client_tls_sslmode is disable."""
    mode = settings.client_tls_sslmode
    if mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.client_tls_cert_file, settings.client_tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            [f"client_tls_cert_file / client_tls_key_file: cannot load certificate and key: {exc}"]
        ) from None
    if settings.client_tls_ca_file:
        try:
            context.load_verify_locations(cafile=settings.client_tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"client_tls_ca_file: cannot load: {exc}"]) from None
        context.verify_mode = ssl.CERT_REQUIRED if mode in ("verify-ca", "verify-full") else ssl.CERT_OPTIONAL
    try:
        with open(settings.client_tls_cert_file, encoding="ascii", errors="replace") as pem:
            der = ssl.PEM_cert_to_DER_cert(_first_certificate(pem.read()))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"client_tls_cert_file: cannot read the certificate: {exc}"]) from None
    return ClientTls(mode, context, certificate_hash(der))


def _first_certificate(pem: str) -> str:
    # The file may hold a chain; channel binding is about the first (our own) certificate.
    end_marker = "-----END CERTIFICATE-----"
    end = pem.find(end_marker)
    start = pem.find("-----BEGIN CERTIFICATE-----")
    if start < 0 or end < 0:
        raise ValueError("no PEM certificate found")
    return pem[start : end + len(end_marker)] + "\n"


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The context for TLS to PostgreSQL, or None when server_tls_sslmode is disable."""
    mode: ServerTlsMode = settings.server_tls_sslmode
    if mode == "disable":
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("verify-ca", "verify-full"):
        try:
            if settings.server_tls_ca_file:
                context.load_verify_locations(cafile=settings.server_tls_ca_file)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"server_tls_ca_file: cannot load: {exc}"]) from None
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # prefer / require: encryption without authentication of the server, as in libpq.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.server_tls_cert_file:
        try:
            context.load_cert_chain(settings.server_tls_cert_file, settings.server_tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"server_tls_cert_file / server_tls_key_file: cannot load: {exc}"]) from None
    return context


def peer_common_name(peercert: object) -> str | None:
    """The subject CN of a verified peer certificate (`getpeercert()`'s dict), if any."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
