"""A throwaway certificate authority for TLS tests, made with the openssl command line.

EC P-256 keys (fast to generate), valid two days. The server certificate names localhost and
127.0.0.1, so verify-full works against either; client certificates carry the user name as CN.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"
DAYS = "2"
_TIMEOUT_S = 30


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=_TIMEOUT_S)


@dataclass(frozen=True)
class CertificateAuthority:
    directory: Path

    @property
    def ca_cert(self) -> str:
        return str(self.directory / "ca.crt")

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def issue(self, name: str, common_name: str, *, server: bool) -> tuple[str, str]:
        """Sign a certificate; return (cert path, key path)."""
        d = self.directory
        extensions = d / f"{name}.ext"
        lines = ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature"]
        if server:
            lines += ["extendedKeyUsage = serverAuth", "subjectAltName = DNS:localhost, IP:127.0.0.1"]
        else:
            lines.append("extendedKeyUsage = clientAuth")
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
            cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", DAYS, "-sha256",
            "-extfile", extensions.name,
            cwd=d,
        )  # fmt: skip
        (d / f"{name}.key").chmod(0o600)
        return str(d / f"{name}.crt"), str(d / f"{name}.key")


def make_ca(directory: Path) -> CertificateAuthority:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=pypooler test CA", "-days", DAYS,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return CertificateAuthority(directory)
