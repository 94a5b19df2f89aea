"""Spot SQL that leaves session state on a server, from the first bytes of a statement's text.

In transaction mode the next borrower inherits whatever a client leaves on its server: a plain
`SET`, a session advisory lock, a temp table without ON COMMIT DROP, `LISTEN`, a `WITH HOLD`
cursor, an SQL `PREPARE`, `set_config(..., false)`. `scan_sql` finds these in the text of a Query
or Parse so `session_state_policy` can log, refuse or pin.

Rules:
- Cheap, not complete: this is a keyword scan of the first `WINDOW` bytes, not an SQL parser.
  It looks at the start of each `;`-separated statement in the window (after comments) and
  searches the window for the two function names that matter. Text past the window, or hidden
  in dynamic SQL (`EXECUTE format(...)` in PL/pgSQL), is not seen.
- Ordinary statements cost a lower-case copy of at most `WINDOW` bytes, two substring searches
  and one `startswith` per statement: no regular expression runs unless a keyword matched.
- Settings the server reports with ParameterStatus (TimeZone, application_name, DateStyle, ...)
  are not session state here: pypooler restores each client's own values on every server it
  gets, so `SET TimeZone` is safe. The caller passes their names (lower case) as `tracked`.
- Besides the leak kinds, `scan_sql` reports DISCARD_ALL, DEALLOCATE_ALL and RESET, which are
  not leaks but change what pypooler knows about the server; SCHEMA_CHANGE (CREATE other
  than of a temporary object, ALTER, DROP, DO), after which shared prepared statements must be
  parsed afresh (see prepared.py); and UNLISTEN, which pypooler may answer itself
  (listening.py: LISTEN and UNLISTEN are spotted by this same scan, so the hot path's quick
  check pays nothing for them). `SET name TO DEFAULT` (and `SET TIME
  ZONE DEFAULT | LOCAL`) is a RESET, as PostgreSQL defines it.
"""

from __future__ import annotations

import re
from typing import Final

WINDOW: Final = 1024  # bytes of a statement's text scanned; keywords come first in SQL

# Kinds of session state (stable names: they label metrics and log lines).
SET: Final = "set"
SET_CONFIG: Final = "set_config"
ADVISORY_LOCK: Final = "advisory_lock"
TEMP_TABLE: Final = "temp_table"
LISTEN: Final = "listen"
WITH_HOLD: Final = "with_hold"
PREPARE: Final = "prepare"
LEAK_KINDS: Final = (SET, SET_CONFIG, ADVISORY_LOCK, TEMP_TABLE, LISTEN, WITH_HOLD, PREPARE)

# Not leaks: statements that reset state pypooler tracks.
DISCARD_ALL: Final = "discard_all"
DEALLOCATE_ALL: Final = "deallocate_all"
RESET: Final = "reset"
SCHEMA_CHANGE: Final = "schema_change"
# Not a leak either: what pypooler answers itself with listen_mode = "multiplex" (listening.py).
UNLISTEN: Final = "unlisten"

NOTHING: Final[tuple[str, ...]] = ()

# What each kind means for the person reading the log or the error.
EXPLANATIONS: Final = {
    SET: "a SET without LOCAL stays on the server after the transaction",
    SET_CONFIG: "set_config(..., false) stays on the server after the transaction",
    ADVISORY_LOCK: "a session advisory lock stays held on the server after the transaction",
    TEMP_TABLE: "a temporary table without ON COMMIT DROP stays on the server",
    LISTEN: "LISTEN registers the server, not the client, for notifications",
    WITH_HOLD: "a WITH HOLD cursor stays open on the server after the transaction",
    PREPARE: "an SQL PREPARE stays on the server, and the next transaction may run elsewhere",
}
HINTS: Final = {
    SET: "use SET LOCAL inside a transaction, or set it per role/database (ALTER ROLE ... SET)",
    SET_CONFIG: "pass true as set_config's third argument (is_local) inside a transaction",
    ADVISORY_LOCK: "use pg_advisory_xact_lock, which is released at the end of the transaction",
    TEMP_TABLE: "add ON COMMIT DROP, or use a session-mode pool",
    LISTEN: "use a session-mode pool for listeners",
    WITH_HOLD: "use a cursor without WITH HOLD inside a transaction, or a session-mode pool",
    PREPARE: "use protocol-level prepared statements (your driver's), which pypooler tracks",
}

# The first words worth a closer look; "/*" and "--" are comments before the first word.
_FIRST_WORDS: Final = (b"set", b"reset", b"prepare", b"listen", b"declare", b"create", b"discard",
                       b"deallocate", b"unlisten", b"alter", b"drop", b"do")  # fmt: skip
# The same, by their first three bytes (a set lookup is cheaper than startswith(tuple)); "do",
# the one word shorter than that, with what may follow it.
_FIRST_THREE: Final = frozenset(
    [word[:3] for word in _FIRST_WORDS if len(word) >= 3] + [b"do" + bytes([after]) for after in b" \t\r\n$"]
)
_COMMENT_HEADS: Final = frozenset({b"/", b"-"})  # (`bytes in bytes` is a slow substring search)
_SPACE: Final = b" \t\r\n\f\v"
_TOKEN = re.compile(rb'"(?:[^"]|"")*"|[a-z_][a-z0-9_$]*|\S')
_WITH_HOLD = re.compile(rb"\bwith\s+hold\b")
_ON_COMMIT_DROP = re.compile(rb"\bon\s+commit\s+drop\b")
_SET_CONFIG = re.compile(rb"set_config\s*\(")
# SET forms whose name is more than one word, or not the setting's name.
_SET_SPECIAL: Final = {b"time": b"timezone", b"names": b"client_encoding", b"schema": b"search_path"}
_SCHEMA_WORDS: Final = frozenset({b"alter", b"drop", b"do"})
_TRANSACTION_SCOPED: Final = frozenset({b"local", b"transaction", b"constraints"})
_TO: Final = frozenset({b"to", b"="})
_SESSION_ONLY: Final = frozenset({b"authorization", b"characteristics"})
_TRUE_WORDS: Final = frozenset({b"true", b"'t'", b"'true'", b"'on'", b"'yes'", b"'1'", b"'y'"})


# The hot path's quick negative (`plainly_harmless`, inlined in RewritingFrontend.feed_to): a
# text that starts with a word whose first three letters are none of _FIRST_THREE, names no
# function ending in _lock or _config (any case), and holds one statement, is NOTHING to
# scan_sql. Written as byte arithmetic, not regular expressions: compiled (setup.py) that costs
# a fraction of a regex search, which also allocates its match state on every call.
# 1 for the bytes a statement's first word cannot start with (blanks, and "/" or "-" of a comment).
NOT_A_WORD_START: Final = bytes(1 if byte in b" \t\r\n\f\v/-" else 0 for byte in range(256))
# The first three bytes of a text, ASCII letters lower-cased (| 0x20 changes no other byte into a
# letter), as one int: `head_key(...) in SUSPECT_HEAD_KEYS` is `data[:3].lower() in _FIRST_THREE`.
SUSPECT_HEAD_KEYS: Final = frozenset(
    ((w[0] | 0x20) << 16) | ((w[1] | 0x20) << 8) | (w[2] | 0x20) for w in _FIRST_THREE
)
# What a regular expression's \s matches in bytes, and ";".
_BLANKS_AND_SEMICOLON: Final = b" \t\n\r\f\v;"
# suspect_text as two regular expressions: RewritingFrontend.feed_to
# uses these when it runs from the sources, where one regex search is cheaper than those calls.
SUSPECT_FUNCTION: Final = re.compile(rb"_(?:[lL][oO][cC][kK]|[cC][oO][nN][fF][iI][gG])")
MORE_STATEMENTS: Final = re.compile(rb";\s*[^\s;]")
_UNDERSCORE: Final = 0x5F
_SEMICOLON: Final = 0x3B
_LOW_L: Final = 0x6C  # "l"
_LOW_C: Final = 0x63  # "c"


def head_key(data: bytes, start: int) -> int:
    return ((data[start] | 0x20) << 16) | ((data[start + 1] | 0x20) << 8) | (data[start + 2] | 0x20)


def suspect_text(data: bytes, start: int, end: int) -> bool:
    """Whether data[start:end] holds "_lock" or "_config" in any case (a call such as
    pg_advisory_lock or set_config, which may leave session state), or something other than
    blanks and semicolons after a semicolon (more than one statement).

    One pass of byte compares: compiled, that is cheaper than even a bytes.find call.
    """
    semicolon = -1
    for i in range(start, end):
        byte = data[i]
        if byte == _UNDERSCORE:
            after = data[i + 1] | 0x20 if i + 1 < end else 0
            if after == _LOW_L:
                if i + 5 <= end and data[i + 1 : i + 5].lower() == b"lock":
                    return True
            elif after == _LOW_C and i + 7 <= end and data[i + 1 : i + 7].lower() == b"config":
                return True
        elif byte == _SEMICOLON and semicolon < 0:
            semicolon = i
    return 0 <= semicolon < end - 1 and bool(data[semicolon + 1 : end].strip(_BLANKS_AND_SEMICOLON))


def plainly_harmless(data: bytes, start: int, end: int) -> bool:
    """Whether the text data[start:end] is certainly nothing to `scan_sql`."""
    return (
        end - start >= 3
        and not NOT_A_WORD_START[data[start]]
        and head_key(data, start) not in SUSPECT_HEAD_KEYS
        and not suspect_text(data, start, end)
    )


def scan_sql(text: bytes, tracked: frozenset[bytes] = frozenset()) -> tuple[str, ...]:
    """Kinds of session state (and DISCARD_ALL/DEALLOCATE_ALL/RESET) found in `text`."""
    low = text[:WINDOW].lower()
    found: tuple[str, ...] = NOTHING
    # find() rather than `in`: measurably cheaper for these needles on CPython 3.11.
    if low.find(b"advisory_lock") >= 0:  # pg_(try_)advisory_lock(_shared), not the _xact_ ones
        found += (ADVISORY_LOCK,)
    if low.find(b"set_config") >= 0 and _session_set_config(low, tracked):
        found += (SET_CONFIG,)
    head = low.lstrip()[:3]
    if head in _FIRST_THREE or head[:1] in _COMMENT_HEADS:  # a keyword, or a comment before one
        return _scan_statements(low, tracked, found)
    # More than one statement? (A ';' that ends the text, the common case, is one find.)
    semicolon = low.find(b";", 0, len(low) - 1)
    if semicolon >= 0 and low[semicolon + 1 :].strip(b" \t\r\n;"):
        return _scan_statements(low, tracked, found)
    return found


def _scan_statements(low: bytes, tracked: frozenset[bytes], found: tuple[str, ...]) -> tuple[str, ...]:
    end = len(low)
    start = 0
    while start < end:
        start = _skip_space_and_comments(low, start)
        semicolon = low.find(b";", start)
        stop = end if semicolon < 0 else semicolon
        if low.startswith(_FIRST_WORDS, start):
            kind = _statement_kind(low[start:stop], tracked)
            if kind is not None and kind not in found:
                found += (kind,)
        if semicolon < 0:
            break
        start = semicolon + 1
    return found


def _skip_space_and_comments(low: bytes, pos: int) -> int:
    end = len(low)
    while pos < end:
        char = low[pos]
        if char in _SPACE:
            pos += 1
        elif low.startswith(b"--", pos):
            newline = low.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
        elif low.startswith(b"/*", pos):
            close = low.find(b"*/", pos + 2)
            pos = end if close < 0 else close + 2
        else:
            break
    return pos


def _statement_kind(statement: bytes, tracked: frozenset[bytes]) -> str | None:
    tokens = _TOKEN.findall(statement, 0, 200)
    first = tokens[0]
    second = tokens[1] if len(tokens) > 1 else b""
    if first == b"set":
        return _set_kind(tokens, tracked)
    if first == b"reset":
        return RESET
    if first == b"prepare":
        return None if second == b"transaction" else PREPARE  # PREPARE TRANSACTION is 2PC
    if first == b"listen":
        return LISTEN
    if first == b"unlisten":
        return UNLISTEN
    if first == b"declare":
        return WITH_HOLD if _WITH_HOLD.search(statement) else None
    if first == b"create":
        # CREATE [OR REPLACE] [GLOBAL | LOCAL] { TEMP | TEMPORARY } ...
        for word in tokens[1:5]:
            if word in (b"temp", b"temporary"):
                return None if _ON_COMMIT_DROP.search(statement) else TEMP_TABLE
            if word not in (b"or", b"replace", b"global", b"local"):
                return SCHEMA_CHANGE
        return SCHEMA_CHANGE
    if first in _SCHEMA_WORDS:
        return SCHEMA_CHANGE
    if first == b"discard":
        return DISCARD_ALL if second == b"all" else None
    if first == b"deallocate":
        words = tokens[1:3]
        return DEALLOCATE_ALL if b"all" in words and words[0] in (b"all", b"prepare") else None
    return None


def _set_kind(tokens: list[bytes], tracked: frozenset[bytes]) -> str | None:
    if len(tokens) < 2:
        return None
    name = tokens[1]
    if name in _TRANSACTION_SCOPED:
        return None
    value = 2  # index of the token after the name
    if name == b"session":
        if len(tokens) < 3 or tokens[2] in _SESSION_ONLY:
            return SET  # SET SESSION AUTHORIZATION / CHARACTERISTICS
        name = tokens[2]
        value = 3
    if name == b"time":  # SET TIME ZONE value
        value += 1
    if value < len(tokens) and tokens[value] in _TO:
        value += 1
    word = tokens[value] if value < len(tokens) else b""
    if word == b"default" or (name == b"time" and word == b"local"):
        return RESET
    name = _SET_SPECIAL.get(name, name).strip(b'"')
    return None if name in tracked else SET


def _session_set_config(low: bytes, tracked: frozenset[bytes]) -> bool:
    """Whether some set_config(name, value, is_local) call in `low` is not local."""
    for match in _SET_CONFIG.finditer(low):
        arguments = _call_arguments(low, match.end())
        if len(arguments) != 3:
            return True  # cannot tell: say so rather than stay silent
        name = arguments[0].strip(b"'").strip()
        if name in tracked:
            continue
        if arguments[2] not in _TRUE_WORDS:
            return True
    return False


def _call_arguments(low: bytes, pos: int) -> list[bytes]:
    """Top-level comma-separated arguments of a call whose '(' ends just before `pos`."""
    arguments: list[bytes] = []
    depth = 0
    quoted = False
    start = pos
    for index in range(pos, len(low)):
        char = low[index]
        if quoted:
            if char == 0x27:  # '
                quoted = False
        elif char == 0x27:
            quoted = True
        elif char == 0x28:  # (
            depth += 1
        elif char == 0x29:  # )
            if depth == 0:
                arguments.append(low[start:index].strip())
                return arguments
            depth -= 1
        elif char == 0x2C and depth == 0:  # ,
            arguments.append(low[start:index].strip())
            start = index + 1
    return arguments  # the call runs past the window: fewer than 3 arguments seen
