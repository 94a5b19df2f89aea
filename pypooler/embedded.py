"""Throwaway PostgreSQL clusters for `pypooler demo`, the integration tests and bench/.

`EmbeddedPostgres` runs initdb into a fresh temporary directory, starts a postmaster on
127.0.0.1 at a random free port, creates a few login roles (one per pg_hba auth method the
pooler must speak to servers) and a database `pypooler_test`, and removes everything on stop.

Rules this module keeps:
- Only 127.0.0.1 and a unix socket inside the cluster's own private directory; never a
  public address, never the system's default socket directory.
- Durability is off (fsync, synchronous_commit, full_page_writes): the data is disposable and
  start-up and tests should be fast.
- PostgreSQL refuses to run as root, so under root every server binary (initdb, pg_ctl,
  postgres) runs as `nobody` and the directory is chowned to it. Clients (psql, pgbench) run
  as whoever we are: they never touch the data directory.
- Subprocesses get a clean environment: no inherited PG* variables, no ~/.psqlrc, no
  ~/.pgpass, no password prompts, C locale (so server messages can be matched in English).
- TLS is optional (`ssl_cert_file`/`ssl_key_file`, optionally `ssl_ca_file`): the files are copied
  into the cluster's directory, owned by the user the server runs as with mode 0600, because
  PostgreSQL refuses a key readable by others and `nobody` cannot read the caller's copies.
- A start that fails leaves no postmaster running; a started cluster is stopped at interpreter
  exit if its owner forgot, but only by the process that started it (not by forked children).
- WAL is minimal unless a cluster is made with `replication=True`; then `standby_of(primary)`
  gives a streaming hot standby of it (pg_basebackup -R into its own directory, its own port,
  run as the same user), which `promote()` turns into a primary: real failovers for the tests.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

__all__ = [
    "DEFAULT_DBNAME",
    "DEFAULT_ROLES",
    "HBA_METHODS",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "Role",
    "find_bindir",
]

logger = logging.getLogger(__name__)

HBA_METHODS = frozenset({"trust", "md5", "scram-sha-256", "password"})
# Methods under which the server checks a password, so the role must have one.
_PASSWORD_METHODS = frozenset({"md5", "scram-sha-256", "password"})

DEFAULT_DBNAME = "pypooler_test"
SUPERUSER = "postgres"
LOOPBACK = "127.0.0.1"

# Random ports come from below the Linux ephemeral range (32768-60999 by default), so outgoing
# connections cannot take our port between the free-port check and the postmaster's bind.
_PORT_RANGE = (20000, 32000)
_START_ATTEMPTS = 10
_LOG_TAIL_LINES = 20
# Generous: a loaded CI machine can take many seconds to run recovery or checkpoint.
_PG_CTL_TIMEOUT_S = 60
_CLIENT_TIMEOUT_S = 120.0
# Log lines that mean "someone else has this port": worth retrying with another one.
_PORT_IN_USE = re.compile(r"could not bind IPv4 address|Address already in use")
# Who runs the server binaries when we are root.
_UNPRIVILEGED_USER = "nobody"
_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
# pg_basebackup -X stream holds two walsenders (the copy and its WAL stream), a running standby
# one: room for a standby streaming while a second one is copied and starts.
_MAX_WAL_SENDERS = 5
_PROMOTE_POLL_S = 0.05


class EmbeddedPostgresError(RuntimeError):
    """A throwaway cluster could not be found, started, stopped or queried."""


@dataclass(frozen=True)
class Role:
    """A login role to create, and how pg_hba.conf authenticates it from 127.0.0.1.

    `method` is the pg_hba method (trust, md5, scram-sha-256, password). The password is stored
    md5-hashed for `md5` and SCRAM-hashed otherwise, so an md5 role really exercises the md5
    exchange and a scram role the SCRAM one.
    """

    name: str
    password: str | None = None
    method: str = "trust"
    superuser: bool = False

    def __post_init__(self) -> None:
        if self.method not in HBA_METHODS:
            raise ValueError(
                f"role {self.name!r}: method {self.method!r} is not one of {sorted(HBA_METHODS)}"
            )
        if self.method in _PASSWORD_METHODS and self.password is None:
            raise ValueError(f"role {self.name!r}: method {self.method!r} needs a password")
        if self.name == SUPERUSER:
            raise ValueError(f"role {SUPERUSER!r} is the cluster's own superuser; pick a name")
        if not self.name or "\x00" in self.name:
            raise ValueError(f"bad role name {self.name!r}")


DEFAULT_ROLES: tuple[Role, ...] = (
    Role("pp_trust"),
    Role("pp_md5", "md5pass", "md5"),
    Role("pp_scram", "scrampass", "scram-sha-256"),
    Role("pp_plain", "plainpass", "password"),
)


def _version_key(bindir: str) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin paths: numeric, so 10 > 9.6."""
    version = os.path.basename(os.path.dirname(bindir))
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _has_server_binaries(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, name), os.X_OK) for name in _SERVER_BINARIES)


def find_bindir() -> str:
    """Return the directory holding PostgreSQL's server binaries (initdb, pg_ctl, postgres).

    Looks at $PYPOOLER_PG_BINDIR, then `pg_config --bindir` (which on Debian may name a
    client-only directory, hence the check), then the newest /usr/lib/postgresql/*/bin and the
    other usual install places. Raises EmbeddedPostgresError saying what was tried.
    """
    tried: list[str] = []
    override = os.environ.get("PYPOOLER_PG_BINDIR")
    if override:
        if _has_server_binaries(override):
            return override
        raise EmbeddedPostgresError(
            f"PYPOOLER_PG_BINDIR={override!r} does not contain {', '.join(_SERVER_BINARIES)}"
        )
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            bindir = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if bindir and _has_server_binaries(bindir):
                return bindir
            tried.append(f"{bindir} (from {pg_config} --bindir)")
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/pgsql-*/bin"),
        key=_version_key,
        reverse=True,
    )
    candidates += ["/usr/local/pgsql/bin", "/usr/local/bin", "/opt/homebrew/bin", "/usr/bin"]
    for bindir in candidates:
        if _has_server_binaries(bindir):
            return bindir
        tried.append(bindir)
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found; install the server "
        "package (e.g. apt-get install postgresql) or set PYPOOLER_PG_BINDIR. Tried: " + ", ".join(tried)
    )


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _hba_name(name: str) -> str:
    # pg_hba.conf takes bare words; anything else (and keywords like "all") must be quoted.
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in {"all", "sameuser", "samerole"}:
        return name
    return '"' + name.replace('"', '""') + '"'


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (bench/ uses this too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def random_free_port() -> int:
    """A free loopback port below the ephemeral range (bench/ uses this too)."""
    # SystemRandom-backed: forked test workers must not share a PRNG state and pick alike.
    low, high = _PORT_RANGE
    for _ in range(100):
        port = low + secrets.randbelow(high - low)
        if port_is_free(port):
            return port
    raise EmbeddedPostgresError(f"no free port on {LOOPBACK} in [{low}, {high})")


def _read_tail(path: str, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as log:
            return "".join(log.readlines()[-lines:]).rstrip()
    except OSError as exc:
        return f"(server log unreadable: {exc})"


class EmbeddedPostgres:
    """A disposable PostgreSQL cluster on 127.0.0.1, with the roles the tests need.

    Use as a context manager, or call start() and stop(). `superuser` ("postgres") is trusted
    from 127.0.0.1 and the unix socket; each Role gets the pg_hba method it names; any other
    role must pass scram-sha-256.
    """

    host: str
    port: int
    superuser: str
    data_dir: str

    def __init__(
        self,
        *,
        max_connections: int = 20,
        roles: Sequence[Role] = DEFAULT_ROLES,
        port: int | None = None,
        extra_conf: Mapping[str, str] | None = None,
        base_dir: str | None = None,
        ssl_cert_file: str | None = None,
        ssl_key_file: str | None = None,
        ssl_ca_file: str | None = None,
        replication: bool = False,
    ) -> None:
        if (ssl_cert_file is None) != (ssl_key_file is None):
            raise ValueError("give both ssl_cert_file and ssl_key_file, or neither")
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2")
        names = [role.name for role in roles]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate role names in {names}")
        self.max_connections = max_connections
        self.roles: dict[str, Role] = {role.name: role for role in roles}
        self.extra_conf: dict[str, str] = dict(extra_conf or {})
        # name in the cluster directory -> source file
        self._tls_files: dict[str, str] = {}
        if ssl_cert_file is not None and ssl_key_file is not None:
            self._tls_files = {"server.crt": ssl_cert_file, "server.key": ssl_key_file}
            if ssl_ca_file is not None:
                self._tls_files["root.crt"] = ssl_ca_file
        self.base_dir = base_dir
        self.replication = replication
        self.host = LOOPBACK
        self.superuser = SUPERUSER
        self.dbname = DEFAULT_DBNAME
        self._fixed_port = port
        self.port = port if port is not None else 0
        self.bindir = find_bindir()
        self.tmp_dir = ""  # the directory we own and remove; holds data/, the socket and the log
        self.data_dir = ""
        self.log_path = ""
        self._running = False
        self._owner_pid: int | None = None  # the process that started us, for atexit
        self._run_as: tuple[int, int] | None = None  # (uid, gid) when we are root
        self.primary: EmbeddedPostgres | None = None  # set by standby_of: start() copies it

    @classmethod
    def standby_of(cls, primary: EmbeddedPostgres, *, base_dir: str | None = None) -> EmbeddedPostgres:
        """A (not yet started) streaming hot standby of `primary`, which must run with
        `replication=True`: its start() takes a base backup of the running primary instead of
        initdb. It has the primary's settings and roles (so psql() knows their passwords); a
        hot standby also needs max_connections and friends at least the primary's.
        """
        if not primary.replication:
            raise ValueError(f"{primary!r} was not made with replication=True")
        standby = cls(
            max_connections=primary.max_connections,
            roles=tuple(primary.roles.values()),
            extra_conf=primary.extra_conf,
            base_dir=base_dir if base_dir is not None else primary.base_dir,
            replication=True,
        )
        standby._tls_files = dict(primary._tls_files)
        standby.primary = primary
        return standby

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<EmbeddedPostgres {self.host}:{self.port} {state} {self.data_dir or '-'}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """initdb, configure, start the postmaster and create the roles and the test database;
        for a standby (standby_of), a base backup of its primary instead of initdb and roles.

        Raises EmbeddedPostgresError (with the server log's last lines) on failure, after
        making sure no postmaster of ours is left running.
        """
        if self._running:
            raise EmbeddedPostgresError(f"{self!r} is already started")
        if self.tmp_dir:
            self._remove_dir()  # a previous failed start's leftovers
        try:
            self._make_dir()
            if self.primary is None:
                self._initdb()
            else:
                self._base_backup(self.primary)
            self._install_tls_files()
            self._write_hba()
            self._start_postmaster()
            self._owner_pid = os.getpid()
            atexit.register(self._stop_at_exit)
            if self.primary is None:
                self._create_roles_and_database()
        except BaseException as exc:
            self._abort_start()
            if isinstance(exc, EmbeddedPostgresError | subprocess.SubprocessError | OSError):
                message = f"embedded PostgreSQL failed to start: {exc}"
                if self.log_path and os.path.exists(self.log_path):
                    message += f"\nserver log {self.log_path} (last lines):\n" + _read_tail(self.log_path)
                raise EmbeddedPostgresError(message) from exc
            raise

    def stop(self) -> None:
        """Stop the postmaster (fast shutdown) and remove the cluster's directory.

        Idempotent, and safe after a failed or never-attempted start.
        """
        atexit.unregister(self._stop_at_exit)
        try:
            if self._running or self._postmaster_pid() is not None:
                self._stop_postmaster()
        finally:
            self._running = False
            self._owner_pid = None
            self._remove_dir()

    def stop_server(self) -> None:
        """Stop the postmaster but keep the cluster, for outage tests; `start_server` brings it back."""
        self._stop_postmaster()

    def start_server(self) -> None:
        """Start a cluster stopped by `stop_server` again, on the same port."""
        result = self._run_server_binary(
            [
                self.bin("pg_ctl"), "start", "-D", self.data_dir, "-l", self.log_path,
                "-w", "-t", str(_PG_CTL_TIMEOUT_S),
            ],
        )  # fmt: skip
        if result.returncode != 0:
            raise self._failure(f"pg_ctl start failed ({result.returncode}): {result.stderr.strip()}")

    def restart(self) -> None:
        """Restart the postmaster on the same port (fast shutdown): every connection drops."""
        if not self._running:
            raise EmbeddedPostgresError(f"{self!r} is not running")
        result = self._run_server_binary(
            [
                self.bin("pg_ctl"), "restart", "-D", self.data_dir, "-l", self.log_path,
                "-m", "fast", "-w", "-t", str(_PG_CTL_TIMEOUT_S),
            ],
        )  # fmt: skip
        if result.returncode != 0:
            self._running = self._postmaster_pid() is not None
            raise self._failure(f"pg_ctl restart failed ({result.returncode}): {result.stderr.strip()}")

    def promote(self) -> None:
        """Promote a standby (pg_ctl promote) and return once it accepts writes."""
        result = self._run_server_binary(
            [self.bin("pg_ctl"), "promote", "-D", self.data_dir, "-w", "-t", str(_PG_CTL_TIMEOUT_S)],
        )
        if result.returncode != 0:
            raise self._failure(f"pg_ctl promote failed ({result.returncode}): {result.stderr.strip()}")
        # pg_ctl -w returns when the control file says "in production"; sessions may still see
        # recovery for a moment, until the startup process has finished its end-of-recovery work.
        deadline = time.monotonic() + _PG_CTL_TIMEOUT_S
        while self.psql("SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise self._failure(f"{self!r} still in recovery {_PG_CTL_TIMEOUT_S} s after pg_ctl promote")
            time.sleep(_PROMOTE_POLL_S)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._running

    # -- helpers for callers -----------------------------------------------------------------

    def bin(self, name: str) -> str:
        """Path of a binary from the server's bindir (psql, pgbench, pg_ctl, ...)."""
        path = os.path.join(self.bindir, name)
        if not os.access(path, os.X_OK):
            raise EmbeddedPostgresError(f"{name} not found in {self.bindir}")
        return path

    def dsn(self, user: str = SUPERUSER, dbname: str = DEFAULT_DBNAME, password: str | None = None) -> str:
        """A postgresql:// URL for this cluster over TCP.

        The password is included only when given: a role's password is not filled in for you,
        so tests can also build password-less DSNs (see password_of()).
        """
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def password_of(self, user: str) -> str | None:
        """The password this cluster created `user` with (None for trust roles and postgres)."""
        role = self.roles.get(user)
        return role.password if role is not None else None

    def psql(
        self,
        sql: str,
        *,
        user: str = SUPERUSER,
        dbname: str = DEFAULT_DBNAME,
        password: str | None = None,
    ) -> str:
        """Run `sql` with psql over TCP and return its unaligned, tuples-only output, stripped.

        Statements run one by one (autocommit), so CREATE DATABASE and friends work. The
        password defaults to the one the role was created with. Raises EmbeddedPostgresError
        carrying psql's stderr on any error.
        """
        if password is None:
            password = self.password_of(user)
        result = self._run_client(
            [
                self.bin("psql"), "-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1",
                "-h", self.host, "-p", str(self.port), "-U", user, "-d", dbname, "-f", "-",
            ],
            input_text=sql,
            password=password,
        )  # fmt: skip
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"psql as {user} on {dbname} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout.strip()

    def terminate_backends(self, *, user: str | None = None, dbname: str | None = None) -> int:
        """pg_terminate_backend() every client backend (optionally of one user/database)
        except our own; return how many were terminated. For "server went away" tests."""
        conditions = ["pid <> pg_backend_pid()", "backend_type = 'client backend'"]
        if user is not None:
            conditions.append(f"usename = {_quote_literal(user)}")
        if dbname is not None:
            conditions.append(f"datname = {_quote_literal(dbname)}")
        output = self.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE " + " AND ".join(conditions),
            dbname="postgres",
        )
        return int(output)

    def env(self, user: str = SUPERUSER, password: str | None = None) -> dict[str, str]:
        """A hermetic environment for client tools (pgbench, psql) aimed at this cluster."""
        env = self._clean_env()
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user, PGDATABASE=self.dbname)
        if password is None:
            password = self.password_of(user)
        if password is not None:
            env["PGPASSWORD"] = password
        return env

    # -- start-up steps ----------------------------------------------------------------------

    def _make_dir(self) -> None:
        if os.geteuid() == 0:
            try:
                nobody = pwd.getpwnam(_UNPRIVILEGED_USER)
            except KeyError:
                raise EmbeddedPostgresError(
                    f"running as root and there is no {_UNPRIVILEGED_USER!r} user to run "
                    "PostgreSQL as (it refuses to run as root)"
                ) from None
            self._run_as = (nobody.pw_uid, nobody.pw_gid)
        self.tmp_dir = tempfile.mkdtemp(prefix="pypooler-pg-", dir=self.base_dir)
        self.data_dir = os.path.join(self.tmp_dir, "data")
        self.log_path = os.path.join(self.tmp_dir, "postgres.log")
        if self._run_as is not None:
            os.chown(self.tmp_dir, *self._run_as)

    def _initdb(self) -> None:
        result = self._run_server_binary(
            [
                self.bin("initdb"), "-D", self.data_dir, "-E", "UTF8", "--locale=C",
                "-U", self.superuser, "-A", "trust", "--no-sync",
            ],
        )  # fmt: skip
        if result.returncode != 0:
            hint = ""
            if self._run_as is not None and "ermission denied" in result.stderr:
                hint = (
                    f" (initdb runs as {_UNPRIVILEGED_USER!r}: every parent directory of "
                    f"{self.tmp_dir} must be searchable by it; pass base_dir='/tmp'?)"
                )
            raise EmbeddedPostgresError(f"initdb failed ({result.returncode}){hint}: {result.stderr.strip()}")

    def _base_backup(self, primary: EmbeddedPostgres) -> None:
        """Copy the running primary into data_dir as a standby (-R: standby.signal and
        primary_conninfo), streaming the WAL written meanwhile; as the user the server runs as."""
        if not primary.running:
            raise EmbeddedPostgresError(f"the primary {primary!r} is not running")
        result = self._run_server_binary(
            [
                self.bin("pg_basebackup"), "-D", self.data_dir, "-h", primary.host,
                "-p", str(primary.port), "-U", primary.superuser, "-R", "-X", "stream",
                "--checkpoint=fast", "--no-sync", "-w",
            ],
        )  # fmt: skip
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_basebackup failed ({result.returncode}): {result.stderr.strip()}"
            )

    def _server_settings(self, port: int) -> dict[str, str]:
        """What pypooler.conf sets (no I/O: the unit tests read it)."""
        settings: dict[str, str] = {
            "port": str(port),
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": self.tmp_dir,
            "max_connections": str(self.max_connections),
            # The default 3 would not fit under a tiny max_connections (it must stay below).
            "superuser_reserved_connections": str(min(3, self.max_connections - 1)),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "replica" if self.replication else "minimal",
            "max_wal_senders": str(_MAX_WAL_SENDERS if self.replication else 0),
            "logging_collector": "off",  # pg_ctl -l sends stderr to our log file
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
        }
        if self._tls_files:
            settings["ssl"] = "on"
            settings["ssl_cert_file"] = os.path.join(self.tmp_dir, "server.crt")
            settings["ssl_key_file"] = os.path.join(self.tmp_dir, "server.key")
            if "root.crt" in self._tls_files:
                settings["ssl_ca_file"] = os.path.join(self.tmp_dir, "root.crt")
        settings.update(self.extra_conf)
        return settings

    def _write_conf(self, port: int) -> None:
        settings = self._server_settings(port)
        lines = [f"{key} = {_quote_literal(value)}" for key, value in settings.items()]
        # A separate include file, rewritten on every attempt (the port changes on retry).
        self._write_owned(os.path.join(self.data_dir, "pypooler.conf"), "\n".join(lines) + "\n")
        main_conf = os.path.join(self.data_dir, "postgresql.conf")
        with open(main_conf, encoding="utf-8") as conf:
            text = conf.read()
        include = "include 'pypooler.conf'\n"
        if include not in text:
            self._write_owned(main_conf, text + "\n" + include)

    def _install_tls_files(self) -> None:
        for name, source in self._tls_files.items():
            with open(source, encoding="ascii") as pem:
                self._write_owned(os.path.join(self.tmp_dir, name), pem.read())

    def _hba_lines(self) -> list[str]:
        """pg_hba.conf's lines (no I/O: the unit tests read them)."""
        lines = [
            "# written by pypooler.embedded: first match wins",
            "local all all trust",
            f"host all {_hba_name(self.superuser)} {LOOPBACK}/32 trust",
            # pg_basebackup and a standby's WAL stream (only with replication=True: walsenders)
            f"host replication {_hba_name(self.superuser)} {LOOPBACK}/32 trust",
        ]
        lines += [
            f"host all {_hba_name(role.name)} {LOOPBACK}/32 {role.method}" for role in self.roles.values()
        ]
        lines.append(f"host all all {LOOPBACK}/32 scram-sha-256")
        return lines

    def _write_hba(self) -> None:
        text = "\n".join(self._hba_lines()) + "\n"
        self._write_owned(os.path.join(self.data_dir, "pg_hba.conf"), text)

    def _start_postmaster(self) -> None:
        attempts = 1 if self._fixed_port is not None else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self._fixed_port if self._fixed_port is not None else random_free_port()
            self._write_conf(self.port)
            log_size = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            result = self._run_server_binary(
                [
                    self.bin("pg_ctl"), "start", "-D", self.data_dir, "-l", self.log_path,
                    "-w", "-t", str(_PG_CTL_TIMEOUT_S),
                ],
            )  # fmt: skip
            if result.returncode == 0:
                self._running = True
                return
            self._kill_postmaster()  # a timed-out start may have left one behind
            new_log = self._log_since(log_size)
            if attempt < attempts and _PORT_IN_USE.search(new_log):
                logger.info("port %d was taken, retrying with another", self.port)
                continue
            raise EmbeddedPostgresError(
                f"pg_ctl start on port {self.port} failed ({result.returncode}): {result.stderr.strip()}"
            )

    def _create_roles_and_database(self) -> None:
        statements: list[str] = []
        for role in self.roles.values():
            options = "LOGIN SUPERUSER" if role.superuser else "LOGIN"
            if role.password is not None:
                encryption = "md5" if role.method == "md5" else "scram-sha-256"
                statements.append(f"SET password_encryption = {_quote_literal(encryption)};")
                options += f" PASSWORD {_quote_literal(role.password)}"
            statements.append(f"CREATE ROLE {_quote_ident(role.name)} {options};")
        statements.append("RESET password_encryption;")
        db = _quote_ident(self.dbname)
        statements.append(f"CREATE DATABASE {db} OWNER {_quote_ident(self.superuser)};")
        for role in self.roles.values():
            statements.append(f"GRANT ALL ON DATABASE {db} TO {_quote_ident(role.name)};")
        # PostgreSQL 15 no longer lets everyone create in public; the test roles need to.
        statements.append(f"\\connect {db}")
        for role in self.roles.values():
            statements.append(f"GRANT ALL ON SCHEMA public TO {_quote_ident(role.name)};")
        self.psql("\n".join(statements) + "\n", dbname="postgres")

    # -- shutdown steps ----------------------------------------------------------------------

    def _stop_at_exit(self) -> None:
        # A forked child (multiprocessing, xdist) inherits our atexit list; the cluster is not
        # its to stop.
        if self._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                self.stop()

    def _stop_postmaster(self) -> None:
        result = self._run_server_binary(
            [
                self.bin("pg_ctl"), "stop", "-D", self.data_dir, "-m", "fast",
                "-w", "-t", str(_PG_CTL_TIMEOUT_S),
            ],
        )  # fmt: skip
        if result.returncode != 0 and self._postmaster_pid() is not None:
            logger.warning("pg_ctl stop failed (%s); killing", result.stderr.strip())
            self._kill_postmaster()

    def _abort_start(self) -> None:
        """Undo a partial start: no postmaster may survive. The log file is kept for reading;
        the data directory (tens of MB) is not."""
        atexit.unregister(self._stop_at_exit)
        self._running = False
        self._owner_pid = None
        with contextlib.suppress(Exception):
            self._kill_postmaster()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.log_path and os.path.exists(self.log_path):
            logger.error("embedded PostgreSQL failed to start; server log: %s", self.log_path)

    def _kill_postmaster(self) -> None:
        """Immediate shutdown, then SIGKILL if the postmaster still lives."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        self._run_server_binary([self.bin("pg_ctl"), "stop", "-D", self.data_dir, "-m", "immediate", "-w"])
        pid = self._postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self._pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _postmaster_pid(self) -> int | None:
        """The live postmaster's pid from postmaster.pid, or None."""
        if not self.data_dir:
            return None
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid"), encoding="ascii") as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return None
        return pid if self._pid_alive(pid) else None

    @staticmethod
    def _pid_alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # Reap it if it is our zombie child (it never is with pg_ctl, but be exact).
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return False
        return True

    def _remove_dir(self) -> None:
        if self.tmp_dir:
            try:
                shutil.rmtree(self.tmp_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("could not remove %s: %s", self.tmp_dir, exc)
        self.tmp_dir = self.data_dir = self.log_path = ""

    # -- subprocess plumbing -----------------------------------------------------------------

    @staticmethod
    def _clean_env() -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", PGSSLMODE="disable")
        # A path that does not exist: libpq warns about /dev/null ("not a plain file").
        env["PGPASSFILE"] = os.path.join(os.sep, "nonexistent", "pgpass")
        return env

    def _run_server_binary(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run initdb/pg_ctl as the unprivileged user when we are root, in the cluster's dir."""
        env = self._clean_env()
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            uid, gid = self._run_as
            kwargs.update(user=uid, group=gid, extra_groups=[])
            env["HOME"] = self.tmp_dir
            env["USER"] = env["LOGNAME"] = _UNPRIVILEGED_USER
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.tmp_dir or None,  # the caller's cwd may be unreadable for `nobody`
            stdin=subprocess.DEVNULL,
            timeout=_PG_CTL_TIMEOUT_S + 30,
            check=False,
            **kwargs,
        )

    def _run_client(
        self, argv: list[str], *, input_text: str, password: str | None
    ) -> subprocess.CompletedProcess[str]:
        env = self._clean_env()
        if password is not None:
            env["PGPASSWORD"] = password
        return subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            env=env,
            timeout=_CLIENT_TIMEOUT_S,
            check=False,
        )

    def _write_owned(self, path: str, text: str) -> None:
        """Write a file the postmaster (maybe `nobody`) can read."""
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(path, 0o600)
        if self._run_as is not None:
            os.chown(path, *self._run_as)

    def _failure(self, message: str) -> EmbeddedPostgresError:
        """An error saying `message`, with the server log's last lines."""
        tail = _read_tail(self.log_path)
        return EmbeddedPostgresError(f"{message}\nserver log {self.log_path} (last lines):\n{tail}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                log.seek(offset)
                return log.read()
        except OSError:
            return ""
