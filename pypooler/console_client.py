"""The admin console client behind `pypooler advise`: libpq (through psycopg) finds the console
and logs in exactly as psql would, then one SHOW runs in the simple query protocol.

Where the connection comes from, parameter by parameter, first found wins:
1. the command line: `--dsn` (a conninfo string or URI), with `--host`, `--port`, `--user` on top;
2. libpq's own sources: a service (`service=` or PGSERVICE: then libpq alone decides, since only
   it reads the service file), PGHOST/PGHOSTADDR, PGPORT, PGUSER;
3. pypooler's settings (the --config file, $PYPOOLER_CONFIG, PYPOOLER_* variables, defaults), so
   that `pypooler advise --config FILE` on the pooler's host reaches that pooler: host
   `unix_socket_dir`, unless it is "" or `client_tls_sslmode` requires TLS (which no unix socket
   carries), else `listen_addr` (an any-address as loopback); port `listen_port`; user the first
   of `admin_users` (else of `stats_users`, who may SHOW too).
Everything else is libpq's alone: the password (PGPASSWORD, `.pgpass` or PGPASSFILE; never the
command line, where `ps` shows it to every user of the host), SCRAM, sslmode and certificates
(PGSSLMODE, PGSSLROOTCERT, ...), the connect timeout. The database is always the console's.

The console speaks only the simple query protocol: psycopg sends a statement without
parameters, in text format and outside a pipeline, as one Query message; `prepare=False` keeps
it from ever preparing it, autocommit keeps BEGIN away.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pypooler.config import ADMIN_DATABASE_NAMES, Settings

CONSOLE_DATABASE = "pgbouncer"
# libpq's default is to wait forever for an unreachable host; a command should not.
CONNECT_TIMEOUT_S = 10
# A pooler listening on every address is reached on loopback.
_ANY_ADDRESS = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
# The libpq environment variables that name each parameter pypooler's settings could fill.
_LIBPQ_ENV = {"host": ("PGHOST", "PGHOSTADDR"), "port": ("PGPORT",), "user": ("PGUSER",)}
# The libpq parameters that already say where to connect (hostaddr is an address for host).
_GIVEN_BY = {"host": ("host", "hostaddr"), "port": ("port",), "user": ("user",)}
# What psycopg writes before libpq's message.
_DRIVER_PREFIXES = ("connection failed: ", "connection is bad: ")
_PASSWORD_FAILURES = ("password authentication failed", "no password supplied")


class ConsoleError(Exception):
    """The console could not be reached or refused the login or the command: one line to print."""


def console_conninfo(
    settings: Settings,
    environ: Mapping[str, str],
    *,
    dsn: str | None = None,
    host: str | None = None,
    port: int | None = None,
    user: str | None = None,
) -> str:
    """The conninfo string for the console (see the module doc for the order of sources).

    Raises ConsoleError for a dsn libpq cannot parse or one naming another database.
    """
    try:
        params: dict[str, str | int | None] = dict(conninfo_to_dict(dsn or ""))
    except psycopg.ProgrammingError as exc:
        raise ConsoleError(f"--dsn: {exc}") from None
    dbname = params.get("dbname")
    if dbname is not None and dbname not in ADMIN_DATABASE_NAMES:
        raise ConsoleError(f"--dsn names database {dbname!r}: the console is {CONSOLE_DATABASE!r}")
    params["dbname"] = dbname or CONSOLE_DATABASE
    params.update({k: v for k, v in {"host": host, "port": port, "user": user}.items() if v is not None})
    if "service" not in params and not environ.get("PGSERVICE"):
        for name, value in _from_settings(settings).items():
            given = any(params.get(key) for key in _GIVEN_BY[name])
            if value is not None and not given and not any(environ.get(var) for var in _LIBPQ_ENV[name]):
                params[name] = value
    if "connect_timeout" not in params and not environ.get("PGCONNECT_TIMEOUT"):
        params["connect_timeout"] = CONNECT_TIMEOUT_S
    return make_conninfo("", **params)


def _from_settings(settings: Settings) -> dict[str, str | int | None]:
    """Where pypooler's settings say the console is, and who may use it."""
    # The socket first: TLS, when required, is required of TCP clients only.
    host = settings.unix_socket_dir or _ANY_ADDRESS.get(settings.listen_addr, settings.listen_addr)
    users = settings.admin_users or settings.stats_users
    return {
        "host": host,
        "port": settings.listen_port or None,  # 0: the OS chose it, the file cannot say
        "user": users[0] if users else None,
    }


def show(conninfo: str, subject: str) -> tuple[list[str], list[tuple[str | None, ...]]]:
    """Run `SHOW subject` on the console; return (column names, rows as text)."""
    try:
        with psycopg.connect(conninfo, autocommit=True, prepare_threshold=None) as conn:
            cursor = conn.execute(f"SHOW {subject}", prepare=False)
            columns = [column.name for column in cursor.description or ()]
            return columns, cursor.fetchall()
    except psycopg.Error as exc:
        raise ConsoleError(one_line(str(exc))) from None


def one_line(message: str) -> str:
    """libpq's message for the first attempt as one line, with where a password comes from when
    that is what failed.

    libpq writes one block per attempt ("connection to server at ... failed: FATAL: ...",
    then DETAIL and HINT lines); sslmode=prefer retries without TLS and psycopg adds a summary
    of several hosts, but the first attempt is the one that says why.
    """
    lines = message.strip().splitlines()
    first = lines[:1]
    for line in lines[1:]:
        if line.startswith(("connection to server", "Multiple connection attempts failed")):
            break
        first.append(line)
    # libpq's "FATAL:  x", its tab-indented hints and DETAIL/HINT lines, as parts of one line.
    text = "; ".join(" ".join(line.split()) for line in first)
    for prefix in _DRIVER_PREFIXES:
        text = text.removeprefix(prefix)
    if any(failure in text for failure in _PASSWORD_FAILURES):
        text += " (the password comes from PGPASSWORD or .pgpass/PGPASSFILE; the console checks auth_file)"
    return text
