"""PgBouncer's configuration file (pgbouncer.ini) read as pypooler settings.

`read_ini(path)` turns a PgBouncer 1.x ini file, `%include`s followed, into the same mapping a
TOML file gives `config.load_settings`, so a team keeps the files it has. The rules it keeps:

- The file's format is PgBouncer's: `[databases]`, `[users]`, `[pgbouncer]` sections of
  `key = value` lines, `;` and `#` comments, `%include FILE` (relative to the working directory,
  as PgBouncer resolves it), booleans as 0/1 (or yes/no, on/off, true/false), comma lists, and
  in `[databases]` a libpq-like connection string per database (`*` the fallback entry).
- A key PgBouncer does not know is an error naming file and line, as PgBouncer refuses it.
- A key PgBouncer knows and pypooler has is translated (`_SETTINGS`, `_DATABASE_KEYS`).
- A key pypooler does not need (logfile, pidfile, syslog, DNS caching, ...) is accepted with one
  warning line that says why (`_NOT_NEEDED`).
- Every one of PgBouncer 1.18's [pgbouncer] keys is one of those two (tests/unit check the list
  in its manual). A [databases] key pypooler lacks would be an error: a setting read from a file
  is never quietly ignored where it changes where clients go.
- A [databases] entry without `host` reaches PostgreSQL's unix socket in `unix_socket_dir`, as
  PgBouncer does (127.0.0.1, with a warning, when the file turns the socket off with "").
- Keys left out of the file take PgBouncer's defaults where they differ from pypooler's
  (`_PGBOUNCER_DEFAULTS`): the same file means the same pooler (session mode, md5, 100 clients).
- Every problem is collected, one line each, in `problems` (config.py raises them together).

`origins` maps each produced setting to the `file:line` it came from, so a value the settings
schema refuses is reported at its line; `to_toml` prints the result for `pypooler convert`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["IniSettings", "read_ini", "to_toml"]

INCLUDE_DEPTH_LIMIT: Final = 10  # PgBouncer's own limit on nested %include
NOT_YET: Final = "not supported by this version of pypooler"
DEFAULT_UNIX_SOCKET_DIR: Final = "/tmp"  # PgBouncer's default on Linux, and pypooler's


@dataclass(slots=True)
class IniSettings:
    """What a pgbouncer.ini says, as pypooler settings (see the module rules)."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)  # setting path -> "file:line"
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- value parsers: each returns the value or raises ValueError with a readable reason.


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "yes", "on", "true"):
        return True
    if lowered in ("0", "no", "off", "false"):
        return False
    raise ValueError(f"must be 0 or 1 (got {text!r})")


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"must be an integer (got {text!r})") from None


def _seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"must be a number of seconds (got {text!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a number of seconds (got {text!r})")
    return value


def _octal(text: str) -> int:
    try:
        return int(text.strip(), 8)
    except ValueError:
        raise ValueError(f"must be an octal file mode such as 0777 (got {text!r})") from None


def _text(text: str) -> str:
    return text.strip()


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _listen_addr(text: str) -> str:
    addresses = _names(text)
    if len(addresses) != 1:
        raise ValueError(f"pypooler listens on one address or * (got {text!r})")
    return addresses[0]


def _auth_type(text: str) -> str:
    value = text.strip()
    if value == "pam":
        raise ValueError(f"pam is {NOT_YET} (trust, any, plain, md5, scram-sha-256, cert and hba are)")
    return "trust" if value == "any" else value  # any: see _check_any_auth


def _verbose(text: str) -> str:
    return "DEBUG" if _integer(text) > 0 else "INFO"


# [pgbouncer] keys pypooler has: PgBouncer's name -> (pypooler's name, parser).
_SETTINGS: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "listen_addr": ("listen_addr", _listen_addr),
    "listen_port": ("listen_port", _integer),
    "unix_socket_dir": ("unix_socket_dir", _text),
    "unix_socket_mode": ("unix_socket_mode", _octal),
    "unix_socket_group": ("unix_socket_group", _text),
    "pool_mode": ("pool_mode", _text),
    "max_client_conn": ("max_client_conn", _integer),
    "default_pool_size": ("default_pool_size", _integer),
    "min_pool_size": ("min_pool_size", _integer),
    "reserve_pool_size": ("reserve_pool_size", _integer),
    "reserve_pool_timeout": ("reserve_pool_timeout", _seconds),
    "max_db_connections": ("max_db_connections", _integer),
    "max_user_connections": ("max_user_connections", _integer),
    "ignore_startup_parameters": ("ignore_startup_parameters", _names),
    "application_name_add_host": ("application_name_add_host", _boolean),
    "stats_period": ("stats_period", _seconds),
    "auth_type": ("auth_type", _auth_type),
    "auth_file": ("auth_file", _text),
    "auth_hba_file": ("auth_hba_file", _text),
    "auth_user": ("auth_user", _text),
    "auth_query": ("auth_query", _text),
    "log_connections": ("log_connections", _boolean),
    "log_disconnections": ("log_disconnections", _boolean),
    "log_pooler_errors": ("log_pooler_errors", _boolean),
    "verbose": ("log_level", _verbose),
    "admin_users": ("admin_users", _names),
    "stats_users": ("stats_users", _names),
    "server_reset_query": ("server_reset_query", _text),
    "server_check_query": ("server_check_query", _text),
    "server_check_delay": ("server_check_delay", _seconds),
    "server_lifetime": ("server_lifetime", _seconds),
    "server_idle_timeout": ("server_idle_timeout", _seconds),
    "server_connect_timeout": ("server_connect_timeout", _seconds),
    "server_login_retry": ("server_login_retry", _seconds),
    "autodb_idle_timeout": ("autodb_idle_timeout", _seconds),
    "client_login_timeout": ("client_login_timeout", _seconds),
    "query_wait_timeout": ("query_wait_timeout", _seconds),
    "idle_transaction_timeout": ("idle_transaction_timeout", _seconds),
    "query_timeout": ("query_timeout", _seconds),
    "client_idle_timeout": ("client_idle_timeout", _seconds),
    "tcp_keepalive": ("tcp_keepalive", _boolean),
    "tcp_keepidle": ("tcp_keepidle", _integer),
    "tcp_keepintvl": ("tcp_keepintvl", _integer),
    "tcp_keepcnt": ("tcp_keepcnt", _integer),
    "tcp_user_timeout": ("tcp_user_timeout", _integer),
    "listen_backlog": ("listen_backlog", _integer),
    "client_tls_sslmode": ("client_tls_sslmode", _text),
    "client_tls_key_file": ("client_tls_key_file", _text),
    "client_tls_cert_file": ("client_tls_cert_file", _text),
    "client_tls_ca_file": ("client_tls_ca_file", _text),
    "server_tls_sslmode": ("server_tls_sslmode", _text),
    "server_tls_ca_file": ("server_tls_ca_file", _text),
    "server_tls_key_file": ("server_tls_key_file", _text),
    "server_tls_cert_file": ("server_tls_cert_file", _text),
    "max_prepared_statements": ("max_prepared_statements", _integer),
}

# PgBouncer's defaults where pypooler's differ, for keys the file leaves out.
_PGBOUNCER_DEFAULTS: Final[dict[str, Any]] = {
    "pool_mode": "session",
    "max_client_conn": 100,
    "auth_type": "md5",
    "server_login_retry": 15.0,
    "admin_users": [],
}

# [pgbouncer] keys pypooler does not need, and why.
_NOT_NEEDED: Final[dict[str, str]] = {
    "logfile": "pypooler logs to stderr; let the service manager keep the file",
    "pidfile": "pypooler runs in the foreground; the service manager knows its PID",
    "user": "pypooler does not switch users; start it as the user it should run as",
    "syslog": "pypooler logs to stderr; journald or the container runtime takes it from there",
    "syslog_ident": "pypooler logs to stderr",
    "syslog_facility": "pypooler logs to stderr",
    "log_stats": "the stats are in /metrics and SHOW STATS",
    "conffile": "the file is the one given with --config",
    "service_name": "Windows only",
    "job_name": "Windows only",
    "disable_pqexec": "the admin console accepts one statement per Query",
    "server_round_robin": "pypooler lends the most recently used idle server (LIFO: a warm pool)",
    "server_reset_query_always": "transaction-mode clients get their own settings at every lend",
    "server_fast_close": "RECONNECT and a changed server address close each server when it is released",
    "suspend_timeout": "pypooler has no SUSPEND (no online restart)",
    "dns_max_ttl": "host names are resolved by the system resolver at each connect",
    "dns_nxdomain_ttl": "host names are resolved by the system resolver at each connect",
    "dns_zone_check_period": "host names are resolved by the system resolver at each connect",
    "resolv_conf": "host names are resolved by the system resolver at each connect",
    "pkt_buf": "buffers are sized per read by the event loop",
    "max_packet_size": "pypooler forwards messages without buffering them whole",
    "sbuf_loopcnt": "the event loop bounds each read",
    "so_reuseport": "one pypooler process per port",
    "tcp_defer_accept": "not used",
    "tcp_socket_buffer": "the kernel's socket buffer sizes apply",
    "client_tls_protocols": "Python's ssl defaults apply (TLS 1.2 and later)",
    "client_tls_ciphers": "Python's ssl defaults apply",
    "client_tls_ecdhcurve": "Python's ssl defaults apply",
    "client_tls_dheparams": "Python's ssl defaults apply",
    "server_tls_protocols": "Python's ssl defaults apply (TLS 1.2 and later)",
    "server_tls_ciphers": "Python's ssl defaults apply",
}

# Keys pypooler does not support yet, with PgBouncer's default (at which they mean "off").
# Ignoring these changes nothing a client or the database relies on: a warning.
# [databases] connection-string keys pypooler has.
_DATABASE_KEYS: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "dbname": ("dbname", _text),
    "host": ("host", _text),
    "port": ("port", _text),  # one, or one per host: joined to the hosts below
    "user": ("user", _text),
    "password": ("password", lambda text: text),
    "pool_size": ("pool_size", _integer),
    "pool_mode": ("pool_mode", _text),
    "min_pool_size": ("min_pool_size", _integer),
    "reserve_pool": ("reserve_pool", _integer),
    "max_db_connections": ("max_db_connections", _integer),
    "connect_query": ("connect_query", _text),
    "auth_user": ("auth_user", _text),
    "client_encoding": ("client_encoding", _text),
    "datestyle": ("datestyle", _text),
    "timezone": ("timezone", _text),
    "application_name": ("application_name", _text),
}
# [users] keys.
_USER_KEYS: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "pool_mode": ("pool_mode", _text),
    "pool_size": ("pool_size", _integer),
    "max_user_connections": ("max_user_connections", _integer),
}

_SECTIONS: Final = frozenset({"databases", "users", "pgbouncer"})
_SECTION = re.compile(r"^\[(?P<name>[^\]]*)\]$")
_KEY_VALUE = re.compile(r"^(?P<key>\"(?:[^\"]|\"\")*\"|[^=\s]+)\s*=\s*(?P<value>.*)$")
_INCLUDE = re.compile(r"^%include\s+(?P<path>.+)$")


def read_ini(path: str | os.PathLike[str]) -> IniSettings:
    """The settings `path` (a pgbouncer.ini) gives, with its warnings and problems."""
    result = IniSettings()
    problems = result.problems
    lines: list[tuple[str, str, str, str]] = []  # (section, key, value, "file:line")
    _collect(Path(path), lines, problems, depth=0)
    databases: dict[str, dict[str, Any]] = {}
    users: dict[str, dict[str, Any]] = {}
    for section, key, value, where in lines:  # a key given twice: the last one wins, as in PgBouncer
        if section == "pgbouncer":
            _pgbouncer_key(key, value, where, result, problems)
    _check_any_auth(lines, result)
    socket_dir = result.values.get("unix_socket_dir", DEFAULT_UNIX_SOCKET_DIR)
    for section, key, value, where in lines:
        if section == "pgbouncer":
            continue
        if section == "databases":
            entry = _database_entry(key, value, where, result, problems, socket_dir)
            if entry is not None:
                databases[_unquote_name(key)] = entry
        else:
            user = _entry("users", _unquote_name(key), value, where, result, problems)
            if user is not None:
                users[_unquote_name(key)] = user
    for name, default in _PGBOUNCER_DEFAULTS.items():
        result.values.setdefault(name, default)
    if databases:
        result.values["databases"] = databases
    if users:
        result.values["users"] = users
    return result


def _check_any_auth(lines: list[tuple[str, str, str, str]], result: IniSettings) -> None:
    """auth_type = any: PgBouncer's trust that ignores the client's user name, which it allows
    only when every [databases] entry logs in as a user of its own; pypooler reads it as trust
    with that same requirement. Unlike PgBouncer it does not make every user an admin of the
    console: admin_users and stats_users still decide (a warning says so)."""
    auth = [
        (value.strip(), where)
        for section, key, value, where in lines
        if (section, key) == ("pgbouncer", "auth_type")
    ]
    if not auth or auth[-1][0] != "any":
        return
    where = auth[-1][1]
    result.warnings.append(
        f"{where}: auth_type = any is read as trust; the console still admits only admin_users and"
        " stats_users (PgBouncer admits anyone as admin)"
    )
    for section, key, value, entry_where in lines:
        if section == "databases" and "user" not in _pairs_or_empty(value):
            result.problems.append(
                f"{entry_where}: database {_unquote_name(key)}: auth_type = any needs user= in every"
                " [databases] entry (the client's user name is ignored), as PgBouncer requires"
            )


def _pairs_or_empty(value: str) -> dict[str, str]:
    try:
        return parse_connection_string(value)
    except ValueError:
        return {}  # reported where the entry is read


def _collect(path: Path, out: list[tuple[str, str, str, str]], problems: list[str], *, depth: int) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"config file {path}: not found")
        return
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"config file {path}: cannot read ({getattr(exc, 'strerror', None) or exc})")
        return
    section = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if match := _INCLUDE.match(line):
            if depth >= INCLUDE_DEPTH_LIMIT:
                problems.append(f"{where}: %include nested more than {INCLUDE_DEPTH_LIMIT} deep")
                continue
            # Relative to the working directory, as PgBouncer resolves it.
            _collect(Path(match["path"].strip()), out, problems, depth=depth + 1)
            continue
        if match := _SECTION.match(line):
            section = match["name"].strip().lower()
            if section not in _SECTIONS:
                problems.append(f"{where}: unknown section [{match['name']}]")
            continue
        match = _KEY_VALUE.match(line)
        if match is None:
            problems.append(f"{where}: expected key = value, got {_shown(line)}")
            continue
        if not section:
            problems.append(f"{where}: {match['key']} is outside any [section]")
            continue
        if section not in _SECTIONS:
            continue  # reported once, at the section's line
        key = match["key"] if section != "pgbouncer" else match["key"].lower()
        out.append((section, key, match["value"].strip(), where))


def _pgbouncer_key(key: str, value: str, where: str, result: IniSettings, problems: list[str]) -> None:
    if key in _SETTINGS:
        name, parse = _SETTINGS[key]
        try:
            result.values[name] = parse(value)
        except ValueError as exc:
            problems.append(f"{where}: {key}: {exc}")
            return
        result.origins[(name,)] = where
    elif key in _NOT_NEEDED:
        result.warnings.append(f"{where}: {key} is not needed by pypooler: {_NOT_NEEDED[key]}")
    else:
        problems.append(f"{where}: unknown setting {key!r}")


def _database_entry(
    key: str, value: str, where: str, result: IniSettings, problems: list[str], socket_dir: str
) -> dict[str, Any] | None:
    name = _unquote_name(key)
    entry = _entry("databases", name, value, where, result, problems)
    if entry is None:
        return None
    if "host" not in entry:  # see the module rules
        entry["host"] = socket_dir or "127.0.0.1"
        if not socket_dir:
            result.warnings.append(
                f"{where}: database {name}: no host= and unix_socket_dir is empty, so 127.0.0.1"
            )
    ports = [port.strip() for port in str(entry.get("port", "5432")).split(",")]
    hosts = [host.strip() for host in entry["host"].split(",")]
    if len(ports) > 1 and len(ports) != len(hosts):
        problems.append(f"{where}: database {name}: {len(ports)} ports for {len(hosts)} hosts")
    elif len(ports) > 1:  # pypooler writes a host's own port beside it
        entry["host"] = ",".join(
            f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in zip(hosts, ports, strict=True)
        )
        del entry["port"]
    elif "port" in entry:
        try:
            entry["port"] = _integer(ports[0])
        except ValueError as exc:
            problems.append(f"{where}: database {name}: port: {exc}")
    return entry


# Per table: what its entries are called in messages, and the options it has.
_TABLES: Final[dict[str, tuple[str, dict[str, tuple[str, Callable[[str], Any]]]]]] = {
    "databases": ("database", _DATABASE_KEYS),
    "users": ("user", _USER_KEYS),
}


def _entry(
    table: str, name: str, value: str, where: str, result: IniSettings, problems: list[str]
) -> dict[str, Any] | None:
    """A `[databases]` or `[users]` line's options as settings (see _TABLES); None if unreadable."""
    kind, keys = _TABLES[table]
    try:
        pairs = parse_connection_string(value)
    except ValueError as exc:
        problems.append(f"{where}: {kind} {name}: {exc}")
        return None
    entry: dict[str, Any] = {}
    for option, text in pairs.items():
        if option in keys:
            setting, parse = keys[option]
            try:
                entry[setting] = parse(text)
            except ValueError as exc:
                problems.append(f"{where}: {kind} {name}: {option}: {exc}")
                continue
            result.origins[(table, name, setting)] = where
        else:
            problems.append(f"{where}: {kind} {name}: unknown option {option!r}")
    result.origins[(table, name)] = where
    return entry


def _unquote_name(key: str) -> str:
    if len(key) >= 2 and key[0] == key[-1] == '"':
        return key[1:-1].replace('""', '"')
    return key


_CONNECTION_PAIR = re.compile(r"\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*")


def parse_connection_string(text: str) -> dict[str, str]:
    """`key=value key='quoted value'` pairs, as in libpq (`\\'` or `''` inside quotes)."""
    pairs: dict[str, str] = {}
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        match = _CONNECTION_PAIR.match(text, position)
        if match is None:
            raise ValueError(f"expected key=value at {_shown(text[position:])}")
        position = match.end()
        if position < len(text) and text[position] == "'":
            value, position = _quoted(text, position + 1)
        else:
            end = position
            while end < len(text) and not text[end].isspace():
                end += 1
            value, position = text[position:end], end
        pairs[match["key"].lower()] = value
    return pairs


def _quoted(text: str, position: int) -> tuple[str, int]:
    chars: list[str] = []
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            chars.append(text[position + 1])
            position += 2
        elif char == "'":
            if text.startswith("''", position):
                chars.append("'")
                position += 2
            else:
                return "".join(chars), position + 1
        else:
            chars.append(char)
            position += 1
    raise ValueError("a quoted value is not closed")


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def to_toml(values: Mapping[str, Any]) -> str:
    """`values` (settings as `read_ini` gives them) as a pypooler TOML file."""
    tables = ("databases", "users")
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if key not in tables]
    for table in tables:
        for name, entry in values.get(table, {}).items():
            lines += ["", f"[{table}.{_toml_key(name)}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return repr(value)
