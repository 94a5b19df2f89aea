"""LISTEN and UNLISTEN as pypooler answers them itself (sans-IO; see listening.py for why).

- `parse_listen_statement`: one LISTEN/UNLISTEN statement and its channel, by PostgreSQL's
  identifier rules: unquoted names folded to lower case (ASCII letters only, as PostgreSQL does
  for UTF-8), "quoted" ones kept (`""` is one `"`), both truncated to 63 bytes at a character
  boundary (with PostgreSQL's NOTICE). Reserved keywords, `U&"..."` names and anything else
  give None: the statement is then left to the server, which answers it (or its error).
- `listen_request`: whether one read of a client is exactly one such statement: a simple Query
  of it (comments, blanks and a trailing `;` allowed), or one extended batch of the unnamed
  portal ending with its Sync: Parse of the unnamed statement, Bind, optional Describe,
  Execute (Flush allowed), or, for a named statement prepared earlier (asyncpg's
  `add_listener` prepares `LISTEN "ch"` and then binds it), Bind, optional Describe, Execute.
- `listen_reply`: the messages PostgreSQL answers that with, one for one.
"""

from __future__ import annotations

from typing import Final

from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import InFailedTransaction, build_notice_response
from pypooler.session_state import NOT_A_WORD_START, head_key

LISTEN: Final = "LISTEN"
UNLISTEN: Final = "UNLISTEN"
MAX_CHANNEL_BYTES: Final = 63  # NAMEDATALEN - 1: PostgreSQL truncates identifiers to this
MAX_LISTEN_TEXT: Final = 4096  # longer LISTEN texts are left to the server (no real name is)
# The messages before a ReadyForQuery 'I' that ends a committed block: CommandComplete "COMMIT".
COMMITTED_TAIL: Final = codec.build_command_complete("COMMIT") + codec.build_ready_for_query(c.TX_IDLE)

_Q: Final = c.F_QUERY
_P: Final = c.F_PARSE
_B: Final = c.F_BIND
_D: Final = c.F_DESCRIBE
_E: Final = c.F_EXECUTE
_S: Final = c.F_SYNC
_H: Final = c.F_FLUSH
# The extended-protocol batches intercepted, as their message types ("s"/"d": Describe of the
# statement / the portal), Flushes left out.
_BATCH_SHAPES: Final = frozenset({b"PBES", b"PBdES", b"PsBES", b"PsBdES", b"BES", b"BdES"})
_BLANKS: Final = frozenset(b" \t\r\n\f\v")
# Bytes an unquoted identifier may start with / continue with (PostgreSQL's scanner: letters,
# "_" and every byte >= 0x80; then also digits and "$").
_IDENT_START: Final = bytes(
    1 if (chr(b).isascii() and (chr(b).isalpha() or b == 0x5F)) or b >= 0x80 else 0 for b in range(256)
)
_IDENT_CONTINUE: Final = bytes(
    1 if _IDENT_START[b] or 0x30 <= b <= 0x39 or b == 0x24 else 0 for b in range(256)
)
# Keywords that are not a ColId (reserved and type/function-name keywords): `LISTEN select` is a
# syntax error in PostgreSQL, so such statements are left to the server to answer.
_NOT_COL_ID: Final = frozenset(
    word.encode()
    for word in (  # noqa: SIM905 (a word list reads better as text)
        "all analyse analyze and any array as asc asymmetric both case cast check collate column"
        " constraint create current_catalog current_date current_role current_time"
        " current_timestamp current_user default deferrable desc distinct do else end except"
        " false fetch for foreign from grant group having in initially intersect into lateral"
        " leading limit localtime localtimestamp not null offset on only or order placing primary"
        " references returning select session_user some symmetric system_user table then to"
        " trailing true union unique user using variadic when where window with"
        " authorization binary collation concurrently cross current_schema freeze full ilike"
        " inner is isnull join left like natural notnull outer overlaps right similar tablesample"
        " verbose"
    ).split()
)


# --------------------------------------------------------------------------- statements


def _skip_blanks(text: bytes, pos: int) -> int:
    """Past blanks and comments (`--` to the end of the line, `/* */`, nested as PostgreSQL's)."""
    end = len(text)
    while pos < end:
        byte = text[pos]
        if byte in _BLANKS:
            pos += 1
        elif byte == 0x2D and text.startswith(b"--", pos):
            newline = text.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
        elif byte == 0x2F and text.startswith(b"/*", pos):
            depth = 1
            pos += 2
            while depth and pos < end:
                if text.startswith(b"/*", pos):
                    depth += 1
                    pos += 2
                elif text.startswith(b"*/", pos):
                    depth -= 1
                    pos += 2
                else:
                    pos += 1
            if depth:
                return -1  # an unterminated comment: PostgreSQL's error, not ours
        else:
            break
    return pos


def _word_end(text: bytes, pos: int) -> int:
    end = len(text)
    while pos < end and _IDENT_CONTINUE[text[pos]]:
        pos += 1
    return pos


def truncate_identifier(name: bytes) -> bytes:
    """`name` cut to 63 bytes, not inside a UTF-8 character (PostgreSQL's pg_mbcliplen)."""
    if len(name) <= MAX_CHANNEL_BYTES:
        return name
    cut = MAX_CHANNEL_BYTES
    while cut > 0 and name[cut] & 0xC0 == 0x80:  # a continuation byte: back to its start
        cut -= 1
    return name[:cut]


def parse_listen_statement(text: bytes) -> tuple[str, bytes | None, bytes] | None:
    """(LISTEN or UNLISTEN, the channel or None for `UNLISTEN *`, the name before truncation)
    when `text` is exactly one such statement; None for anything else."""
    pos = _skip_blanks(text, 0)
    if pos < 0:
        return None
    word_end = _word_end(text, pos)
    keyword = text[pos:word_end].lower()
    if keyword == b"listen":
        action = LISTEN
    elif keyword == b"unlisten":
        action = UNLISTEN
    else:
        return None
    pos = _skip_blanks(text, word_end)
    end = len(text)
    if pos < 0 or pos >= end:
        return None
    byte = text[pos]
    channel: bytes | None
    if byte == 0x2A:  # "*"
        if action != UNLISTEN:
            return None
        channel = None
        pos += 1
    elif byte == 0x22:  # a quoted identifier: "" is one quote
        parts = []
        pos += 1
        while True:
            close = text.find(b'"', pos)
            if close < 0:
                return None
            parts.append(text[pos:close])
            if text.startswith(b'""', close):
                parts.append(b'"')
                pos = close + 2
            else:
                pos = close + 1
                break
        channel = b"".join(parts)
        if not channel:
            return None  # zero-length delimited identifier: PostgreSQL's error
    elif _IDENT_START[byte]:
        name_end = _word_end(text, pos)
        channel = text[pos:name_end].lower()  # ASCII letters only, as PostgreSQL for UTF-8
        if channel in _NOT_COL_ID or (channel == b"u" and text.startswith(b'&"', name_end)):
            return None
        pos = name_end
    else:
        return None
    while True:
        pos = _skip_blanks(text, pos)
        if pos < 0:
            return None
        if pos < end and text[pos] == 0x3B:  # ";"
            pos += 1
            continue
        break
    if pos != end:
        return None
    if channel is None:
        return action, None, b""
    return action, truncate_identifier(channel), channel


def unlisten_channels(text: bytes) -> list[bytes | None]:
    """The channels (None: all) of the UNLISTEN statements among the `;`-separated statements
    of `text` (a `;` inside a quoted name or a comment hides the statement: it is not seen)."""
    found: list[bytes | None] = []
    for statement in text.split(b";"):
        parsed = parse_listen_statement(statement)
        if parsed is not None and parsed[0] == UNLISTEN:
            found.append(parsed[1])
    return found


class ListenRequest:
    """A LISTEN/UNLISTEN that pypooler answers itself: what to do, and the messages it came in
    (`shape`: "Q", or the extended batch's types with "s"/"d" for a Describe of the statement /
    the portal and "H" for Flush), so the reply matches them one for one."""

    __slots__ = ("action", "channel", "notice", "shape", "sync_server")

    def __init__(self, action: str, channel: bytes | None, shape: bytes, notice: bytes = b"") -> None:
        self.action = action
        self.channel = channel  # None: UNLISTEN *
        self.shape = shape
        self.notice = notice  # PostgreSQL's NOTICE about a truncated name, or b""
        # The client's server has an unsynced batch of this client's (asyncpg: Parse, Describe,
        # Flush of the statement, then this Bind): it needs the Sync the client sent to us.
        self.sync_server = False

    def __repr__(self) -> str:
        return f"ListenRequest({self.action}, {self.channel!r}, {self.shape!r})"


def _request_from_text(text: bytes, shape: bytes) -> ListenRequest | None:
    parsed = parse_listen_statement(text)
    if parsed is None:
        return None
    action, channel, given = parsed
    notice = b""
    if channel is not None and len(given) > len(channel):
        notice = build_notice_response(
            f'identifier "{given.decode("utf-8", "replace")}" will be truncated to'
            f' "{channel.decode("utf-8", "replace")}"',
            sqlstate="42622",
        )
    return ListenRequest(action, channel, shape, notice)


# The first three letters of LISTEN and UNLISTEN as `session_state.head_key` reads them.
_LISTEN_HEADS: Final = frozenset({head_key(b"lis", 0), head_key(b"unl", 0)})


def may_be_listen(data: bytes) -> bool:
    """A cheap first look for `listen_request`, for reads that did not go through the rewriter's
    session-state scan: a Query, or a Parse of the unnamed statement, whose text starts with
    "lis" or "unl" (any case), a blank or a comment."""
    if len(data) < 10:
        return False
    if data[0] == _Q:
        start = 5
    elif data[0] == _P and data[5] == 0:
        start = 6
    else:
        return False
    return bool(NOT_A_WORD_START[data[start]]) or head_key(data, start) in _LISTEN_HEADS


def listen_request(data: bytes, named_text: bytes | None = None) -> ListenRequest | None:
    """The LISTEN/UNLISTEN that `data` (one whole read) consists of, if it is nothing else: one
    simple Query of one statement, or one extended batch of the unnamed portal without
    parameters, ending with its Sync. `named_text`: the text of the named statement a batch
    starting with Bind uses. None for anything else (left to the server)."""
    end = len(data)
    if end < 6 or end > MAX_LISTEN_TEXT:
        return None
    first = data[0]
    if first == _Q:
        if int.from_bytes(data[1:5], "big") + 1 != end or data[end - 1] != 0:
            return None
        return _request_from_text(data[5 : end - 1], b"Q")
    if first != _P and not (first == _B and named_text is not None):
        return None
    shape = bytearray()
    text = b""
    pos = 0
    while pos < end:
        if end - pos < 5:
            return None
        msg_type = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        msg_end = pos + 1 + length
        if length < 4 or msg_end > end:
            return None
        body = data[pos + 5 : msg_end]
        if msg_type == _P:
            if pos or not body or body[0]:  # first, and of the unnamed statement
                return None
            text_end = body.find(b"\0", 1)
            if text_end < 0:
                return None
            text = body[1:text_end]
            shape.append(_P)
        elif msg_type == _B:
            # The unnamed portal; the unnamed statement after a Parse, or the named one first.
            if not body or body[0]:
                return None
            name_end = body.find(b"\0", 1)
            if name_end < 0:
                return None
            if name_end > 1:
                if pos or named_text is None:
                    return None
                text = named_text
            elif not shape:
                return None
            # The counts of parameter formats and of parameter values (0).
            formats_at = name_end + 1
            if len(body) < formats_at + 4:
                return None
            values_at = formats_at + 2 + 2 * int.from_bytes(body[formats_at : formats_at + 2], "big")
            if len(body) < values_at + 2 or body[values_at : values_at + 2] != b"\0\0":
                return None
            shape.append(_B)
        elif msg_type == _D:
            if len(body) != 2 or body[1] or body[0] not in b"SP":
                return None
            shape.append(ord("s") if body[0] == ord("S") else ord("d"))
        elif msg_type == _E:
            if not body or body[0]:
                return None
            shape.append(_E)
        elif msg_type == _S:
            if msg_end != end:
                return None
            shape.append(_S)
        elif msg_type == _H:
            shape.append(_H)
        else:
            return None
        pos = msg_end
    if bytes(shape).replace(b"H", b"") not in _BATCH_SHAPES:
        return None
    return _request_from_text(text, bytes(shape))


_IN_FAILED_BLOCK: Final = InFailedTransaction(
    "current transaction is aborted, commands ignored until end of transaction block"
).to_error_response()
_NO_PARAMETERS: Final = codec.build_message(c.B_PARAMETER_DESCRIPTION, b"\0\0")
_NO_DATA: Final = codec.build_message(c.B_NO_DATA)
_BIND_COMPLETE: Final = codec.build_message(c.B_BIND_COMPLETE)


def listen_reply(request: ListenRequest, status: int, error: bytes = b"") -> bytes:
    """What PostgreSQL answers `request` with, in transaction status `status`; `error` (an
    ErrorResponse) makes it fail like a statement that errors."""
    ready = codec.build_ready_for_query(status)
    if status == c.TX_FAILED:
        error = _IN_FAILED_BLOCK
    if error:
        # A simple Query ends at its error; an extended batch skips to its Sync.
        return error + ready
    tag = codec.build_command_complete(request.action)
    out = [request.notice]
    for kind in request.shape:
        if kind == _Q:
            out.append(tag + ready)
        elif kind == _P:
            out.append(codec.PARSE_COMPLETE)
        elif kind == _B:
            out.append(_BIND_COMPLETE)
        elif kind == ord("s"):
            out.append(_NO_PARAMETERS + _NO_DATA)
        elif kind == ord("d"):
            out.append(_NO_DATA)
        elif kind == _E:
            out.append(tag)
        elif kind == _S:
            out.append(ready)
    return b"".join(out)


def notification_channel(body: bytes) -> bytes:
    """The channel of a NotificationResponse body (pid, channel, payload)."""
    end = body.find(b"\0", 4)
    return body[4:end] if end >= 4 else b""


def quote_channel(channel: bytes) -> bytes:
    return b'"' + channel.replace(b'"', b'""') + b'"'
