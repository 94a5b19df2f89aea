"""Per-client session parameters: what a client asked for at startup, and the SQL that gives a
borrowed server those values.

A client in transaction mode sees many servers; each must look, to that client, like its own
session. Two kinds of settings are kept per client:

- *Reported* settings: the ones the server announces with ParameterStatus (client_encoding,
  DateStyle, IntervalStyle, TimeZone, standard_conforming_strings, application_name, and on newer
  servers search_path, default_transaction_read_only...). The client's values start from the
  pool's (what the welcome showed it), overridden by its startup packet, and follow every
  ParameterStatus it receives; a server's values follow every ParameterStatus it sends.
- *Other* settings the client gave at startup (`options=-c statement_timeout=5s`, or an unknown
  startup parameter, which PostgreSQL also treats as a setting): the server does not report
  them, so pypooler remembers what it set on each server.

Rules:
- `settings_sql` sets values with `pg_catalog.set_config(name, value, false)`, which takes the
  value exactly as a startup packet gives it (a list such as search_path included), and resets
  other settings with `RESET`.
- Read-only reported parameters (server_version, is_superuser, ...) are never set.
- A client is told reported values as PostgreSQL spells them (`eucjp` is `EUC_JP`,
  `iso, dmy` is `ISO, DMY`, `europe/rome` is `Europe/Rome`): the pool asks a server once per
  (name, value) with `spelling_sql` and keeps the answer; application_name is cleaned here
  (`clean_ascii`), as PostgreSQL does.
- A startup parameter is applied, ignored (`ignore_startup_parameters`), or refused with an
  error naming it: never dropped silently. `replication` and `options` switches other than
  `-c name=value` / `--name=value` are refused here; a setting PostgreSQL rejects is refused
  with PostgreSQL's own error the first time pypooler applies it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Final

from pypooler.protocol.errors import UnsupportedStartupParameter

# Reported parameters no session can change (lower case).
READ_ONLY: Final = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "is_superuser",
    "session_authorization", "in_hot_standby",
})  # fmt: skip
# Startup packet keys that are not settings.
_CONNECTION_KEYS: Final = frozenset({"user", "database", "options", "replication"})


def split_options(options: str) -> list[str]:
    """Split a startup `options` string as PostgreSQL does: on spaces, `\\` escaping the next
    character (so `-c search_path=a\\ b` is one argument)."""
    arguments: list[str] = []
    current: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if current:
                arguments.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        arguments.append("".join(current))
    return arguments


def options_settings(options: str) -> list[tuple[str, str]]:
    """The (name, value) settings of an `options` string; anything else is refused."""
    settings: list[tuple[str, str]] = []
    arguments = split_options(options)
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument == "-c" and index + 1 < len(arguments):
            assignment = arguments[index + 1]
            index += 2
        elif argument.startswith(("-c", "--")) and len(argument) > 2:  # -cname=value, --name=value
            assignment = argument[2:]
            index += 1
        else:
            raise UnsupportedStartupParameter(
                f'unsupported startup option "{argument}"',
                detail="pypooler applies only settings (-c name=value or --name=value) from options",
            )
        name, equals, value = assignment.partition("=")
        if not equals or not name:
            raise UnsupportedStartupParameter(
                f'invalid startup option "{assignment}": expected name=value',
            )
        # PostgreSQL accepts dashes for underscores in option names.
        settings.append((name.replace("-", "_"), value))
    return settings


def startup_settings(
    parameters: Mapping[str, str],
    reported: Mapping[str, str],
    ignore: Collection[str],
) -> tuple[dict[str, str], dict[str, str]]:
    """Split a startup packet's parameters into (reported overrides, other settings).

    `reported` maps lower-case names of the pool's reported parameters to their spelling (so
    `datestyle=ISO` overrides `DateStyle`). Other settings are keyed by lower-case name.
    """
    overrides: dict[str, str] = {}
    others: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for name, value in parameters.items():
        lower = name.lower()
        if lower in ignore or lower.startswith("_pq_."):
            continue
        if lower == "replication":
            raise UnsupportedStartupParameter(
                "replication connections are not supported by pypooler",
                hint="connect to the server directly for replication",
            )
        if lower == "options":
            pairs.extend(options_settings(value))
        elif lower not in _CONNECTION_KEYS:
            pairs.append((name, value))
    for name, value in pairs:
        lower = name.lower()
        if lower in ignore:
            continue
        if lower in READ_ONLY:
            raise UnsupportedStartupParameter(f'parameter "{name}" cannot be set')
        spelling = reported.get(lower)
        if spelling is not None:
            overrides[spelling] = value
        else:
            others[lower] = value
    return overrides, others


def same_value(name: str, a: str, b: str) -> bool:
    """Whether a startup value means what the server reports, where the spelling differs only in
    ways PostgreSQL ignores (encoding names: `utf-8` is `UTF8`; case, for time zones): a value
    that means the server's default is spelled as the default without asking a server."""
    if a == b:
        return True
    if name.lower() == "client_encoding":
        return _encoding_key(a) == _encoding_key(b)
    if name.lower() == "timezone":
        return a.lower() == b.lower()
    return False


def _encoding_key(name: str) -> str:
    return "".join(char for char in name.lower() if char.isalnum())


def clean_ascii(text: str) -> str:
    """application_name as PostgreSQL keeps and reports it: each byte outside printable ASCII
    (of the UTF-8 text) becomes `?`."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if " " <= char <= "~" else "?" * len(char.encode()) for char in text)


def spelling_sql(pairs: Sequence[tuple[str, str]], defaults: Mapping[str, str]) -> str:
    """One SELECT whose row gives each (name, value) as the server reports it: the value set
    locally (undone when the query's implicit transaction ends, so the server keeps its
    settings) on top of the server's default, as a startup packet applies it (`DateStyle=dmy`
    keeps the default's `ISO`). Columns alternate: the default set again, then the value."""
    calls = []
    for name, value in pairs:
        default = defaults.get(name)
        if default is not None:
            calls.append(f"pg_catalog.set_config({_literal(name)}, {_literal(default)}, true)")
        else:
            calls.append("NULL")
        calls.append(f"pg_catalog.set_config({_literal(name)}, {_literal(value)}, true)")
    return f"SELECT {', '.join(calls)}"


def settings_sql(
    wanted: Mapping[str, str],
    current: Mapping[str, str],
    wanted_others: Mapping[str, str],
    current_others: Mapping[str, str],
    *,
    others_unknown: bool = False,
) -> str:
    """SQL giving a server `wanted` values; "" when it has them already.

    `current_others` are the other settings pypooler set on the server. With `others_unknown`
    (a client ran RESET, DISCARD ALL or SET there since) every wanted one is set again, and
    every one pypooler set before is reset.
    """
    calls = [
        f"pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)"
        for name, value in wanted.items()
        if current.get(name) != value and name.lower() not in READ_ONLY
    ]
    resets: list[str] = []
    if wanted_others or current_others:
        for name, value in wanted_others.items():
            if others_unknown or current_others.get(name) != value:
                calls.append(f"pg_catalog.set_config({_literal(name)}, {_literal(value)}, false)")
        resets = [f"RESET {_identifier(name)}" for name in current_others if name not in wanted_others]
    statements = ([f"SELECT {', '.join(calls)}"] if calls else []) + resets
    return "; ".join(statements)


def _literal(text: str) -> str:
    # E'' reads the same whatever standard_conforming_strings the session has, and \u escapes
    # keep the SQL ASCII: the server decodes it with the session's current client_encoding,
    # which may be the previous client's.
    escaped = text.replace("\\", "\\\\").replace("'", "''")
    if not escaped.isascii():
        escaped = "".join(char if char.isascii() else _unicode_escape(char) for char in escaped)
    return "E'" + escaped + "'"


def _unicode_escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
