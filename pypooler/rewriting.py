"""Transaction-mode streams: what pypooler changes between a client and the server it borrows.

`RewritingFrontend` (client -> server) and `RewritingBackend` (server -> client) replace the plain
trackers of `protocol/transaction.py` in transaction and statement mode. They keep the trackers'
accounting (when a transaction ends) and add:

- Named prepared statements (see `prepared.py`): a client's Parse/Bind/Describe/Close naming a
  statement is rewritten to the statement's server-side name; a Bind or Describe for a statement
  the current server lacks gets a Close + Parse of it injected in front (the Close makes the Parse
  safe even if the server had it after all); a client's Parse of a statement the server already
  has, and a client's Close, are sent as a Close of a name that never exists ("placeholder").
- Session-state statements (see `session_state.py`), found in Query and Parse texts; with
  `refuse` set they are replaced by a placeholder Close followed by a Describe that fails.
- The unnamed statement passes untouched, but the server's may be another client's: a Bind or
  Describe of it by a client whose Parse did not make it is answered with PostgreSQL's 26000 the
  same way (see `ServerStatements.unnamed_owner`).
- Internal replies: the Query pypooler sends before a client's first message to set its session
  parameters is answered first, and that answer is dropped whole (`RewritingBackend.internal`).

Why placeholders: PostgreSQL answers a Close of a statement that does not exist with an ordinary
CloseComplete, at the exact place of the client's message in its batch, and skips it (no reply)
after an earlier error, exactly as it would the client's own message. So pypooler never has to
work out where a reply goes: it swaps the placeholder's CloseComplete for what the client expects
(CloseComplete, ParseComplete, or an ErrorResponse followed by the dropped error of the failing
Describe, which also makes the server skip to Sync and fail an open transaction, as PostgreSQL
would).

How replies are matched without following every message: ParseComplete answers only Parse and
CloseComplete only Close, in order, and after an error no more of either come before the
ReadyForQuery. So the k-th ParseComplete after a ReadyForQuery answers the k-th Parse sent in that
batch, if any answers it at all. Each batch with something to watch gets a `Batch` keyed by the
number of the ReadyForQuery that ends it; at that ReadyForQuery, every change made for a message
that got no reply is undone (in reverse order).

Hot-path rules (as in `protocol/transaction.py`): messages that need nothing pass as the very
bytes received, skipped by arithmetic; a statement name is checked with one byte for the unnamed
case; Query/Parse texts are scanned only in their first `session_state.WINDOW` bytes; a message
is assembled (held back across reads) only when pypooler must read more of it than its header,
and then only as much as it needs. The output of one read is one `bytes` object.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from pypooler.prepared import (
    SERVER_NAME_PREFIX,
    ClientStatements,
    SchemaVersion,
    ServerStatements,
    Statement,
    is_stale_plan,
)
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.codec import NATIVE, pack_header, unpack_header
from pypooler.protocol.errors import (
    DuplicatePreparedStatement,
    PoolerError,
    ProtocolViolation,
    SessionStateRefused,
    UndefinedPreparedStatement,
)
from pypooler.protocol.listen import ListenRequest, listen_request, parse_listen_statement, unlisten_channels
from pypooler.protocol.transaction import (
    CONTROL_FIRST_BYTES,
    FATAL_STARTS,
    STATEMENT_SAMPLE,
    BackendStream,
    FrontendStream,
    is_transaction_control,
)
from pypooler.session_state import (
    DEALLOCATE_ALL,
    DISCARD_ALL,
    EXPLANATIONS,
    HINTS,
    LEAK_KINDS,
    LISTEN,
    MORE_STATEMENTS,
    NOT_A_WORD_START,
    RESET,
    SCHEMA_CHANGE,
    SUSPECT_FUNCTION,
    SUSPECT_HEAD_KEYS,
    UNLISTEN,
    WINDOW,
    scan_sql,
    suspect_text,
)

# A statement name pypooler never prepares (server-side names are PYPOOLER_<number>).
PLACEHOLDER_NAME: Final = b"PYPOOLER_NONE"
PLACEHOLDER_CLOSE: Final = codec.build_close_statement(PLACEHOLDER_NAME)
FAILING_DESCRIBE: Final = codec.build_describe_statement(PLACEHOLDER_NAME)
# Whole named Parse messages are held in memory to read their text; bigger ones are refused.
MAX_NAMED_PARSE: Final = 16 << 20
# Parse texts whose session-state verdicts a pool remembers (see the unnamed Parse): at most
# this many texts of at most session_state.WINDOW bytes.
MAX_REMEMBERED_TEXTS: Final = 1024
# Bind/Describe/Close are held only up to their statement name; a longer prefix is an attack.
MAX_NAMES_PREFIX: Final = codec.MAX_BUFFERED_MESSAGE

_Q: Final = c.F_QUERY
_S: Final = c.F_SYNC
_E: Final = c.F_EXECUTE
_P: Final = c.F_PARSE
_B: Final = c.F_BIND
_D: Final = c.F_DESCRIBE
_C: Final = c.F_CLOSE
_F: Final = c.F_FUNCTION_CALL
_X: Final = c.F_TERMINATE
_COPY_DATA: Final = c.F_COPY_DATA
_COPY_DONE: Final = c.F_COPY_DONE
_COPY_FAIL: Final = c.F_COPY_FAIL
_STATEMENT: Final = ord("S")  # Describe/Close target kind

_Z: Final = c.B_READY_FOR_QUERY
_PARSE_COMPLETE: Final = c.B_PARSE_COMPLETE
_CLOSE_COMPLETE: Final = c.B_CLOSE_COMPLETE
_PARAMETER_STATUS: Final = c.B_PARAMETER_STATUS
_ERROR: Final = c.B_ERROR_RESPONSE
_TX_FAILED: Final = c.TX_FAILED
_TX_IDLE: Final = c.TX_IDLE
# The server messages the fast loop looks into, as a table indexed by type byte (compiled, an
# index into bytes is C; a set lookup boxes the int and hashes it).
_WATCHED: Final = bytes(
    1 if byte in (_Z, _PARSE_COMPLETE, _CLOSE_COMPLETE, _PARAMETER_STATUS, _ERROR) else 0
    for byte in range(256)
)
_L: Final = ord("l")


class PendingReply:
    """What to do with the server's reply to one message pypooler sent (ParseComplete or
    CloseComplete), and what to undo if the batch ends without it."""

    __slots__ = ("confirm", "fail_next", "replacement", "replied", "swallow", "undo")

    def __init__(
        self,
        *,
        swallow: bool = False,
        replacement: bytes | None = None,
        fail_next: bool = False,
        confirm: Callable[[], None] | None = None,
        undo: Callable[[], None] | None = None,
    ) -> None:
        self.swallow = swallow  # drop the reply (the client did not send this message)
        self.replacement = replacement  # send these bytes instead of the reply
        self.fail_next = fail_next  # then drop the next ErrorResponse (the failing Describe's)
        self.confirm = confirm
        self.undo = undo
        self.replied = False


class Batch:
    """Replies to watch for in one batch: the messages up to the Sync (or Query) that ends it."""

    __slots__ = ("closes", "number", "parses", "replies")

    def __init__(self, number: int) -> None:
        self.number = number  # the batch ends at the client's number-th ReadyForQuery
        self.parses: dict[int, PendingReply] = {}  # by index of the Parse within the batch
        self.closes: dict[int, PendingReply] = {}  # by index of the Close within the batch
        self.replies: list[PendingReply] = []  # in the order sent, for undo

    def settle(self) -> None:
        """The batch's ReadyForQuery came: undo what got no reply, newest first."""
        for reply in reversed(self.replies):
            if not reply.replied and reply.undo is not None:
                reply.undo()


class RewritingFrontend(FrontendStream):
    """Client -> server in transaction/statement mode; see the module docstring.

    `feed_to(data, server)` returns the bytes to write to the server (the very `data` object when
    nothing changed). Findings for the caller, off the hot path, all flagged by `noted`:
    `session_state` (kinds seen since the caller last cleared it), `reset_seen` (DISCARD ALL /
    DEALLOCATE ALL / RESET / SET: the server's settings are no longer what pypooler set),
    `settings_reset` (RESET / DISCARD ALL: settings went back to the server's defaults, where
    PostgreSQL would have gone back to the client's startup values),
    `terminated` (a Terminate was reached; the bytes after it were not returned),
    `listen_request` (with `intercept_listen`: the read was one LISTEN/UNLISTEN the client is to
    be answered by pypooler, see listening.py; nothing of it was returned or counted),
    `discarded` (a DISCARD ALL: it also UNLISTENs *), `unlistens` (with `intercept_listen`: the
    channels, None for all, of UNLISTENs sent to the server among other statements of a Query,
    as asyncpg's pool does when it resets a connection).
    """

    __slots__ = ("_batch", "_closes", "_counted", "_dropping", "_parses", "_unnamed_batch", "batches",
                 "discarded", "intercept_listen", "listen_request", "noted", "refuse",
                 "requests", "reset_seen", "session_state", "settings_reset", "statements", "status",
                 "terminated", "tracked", "unlistens", "verdicts")  # fmt: skip

    def __init__(
        self,
        statements: ClientStatements | None,
        *,
        tracked: frozenset[bytes] = frozenset(),
        refuse: bool = False,
        verdicts: dict[bytes, tuple[str, ...]] | None = None,
        intercept_listen: bool = False,
    ) -> None:
        super().__init__()
        self.statements = statements  # None: named statements pass through untracked
        self.tracked = tracked  # reported setting names (lower case): SET of them is no leak
        self.refuse = refuse  # session_state_policy = "error"
        # `_head` (FrontendStream's) holds the start of a message we must read more of.
        self._dropping = False  # the `_skip` bytes belong to a message we do not forward
        self.requests = 0  # ReadyForQuery-producing messages sent (Query, Sync, FunctionCall)
        # Made at the first batch with a plan: an empty deque is 760 bytes, and most clients
        # never need one.
        self.batches: deque[Batch] | None = None
        self._batch: Batch | None = None  # the open batch's entry, if it has one
        self._parses = 0  # Parse messages sent in the open batch
        self._closes = 0  # Close messages sent in the open batch
        self._counted = False  # any of the three above set: reset them when the batch ends
        self.noted = False  # session_state, reset_seen or terminated set: the caller looks
        # Tuples, not lists: an empty tuple is shared, and most clients never add to these
        # (an idle client's memory is the bound on how many a pooler holds).
        self.session_state: tuple[str, ...] = ()
        self.reset_seen = False
        self.settings_reset = False
        # `requests` during the batch whose Parse of the unnamed statement came after other
        # messages: an error in those would have made the server skip it, so the statement is
        # the client's in that batch only (see ServerStatements.unnamed_owner).
        self._unnamed_batch = -1
        self.terminated = False
        self.status = c.TX_IDLE  # transaction status in the latest ReadyForQuery
        # scan_sql results by Parse text, shared by the clients of a pool (same `tracked`).
        self.verdicts: dict[bytes, tuple[str, ...]] = {} if verdicts is None else verdicts
        self.intercept_listen = intercept_listen  # listen_mode = "multiplex"
        self.listen_request: ListenRequest | None = None
        self.discarded = False
        self.unlistens: tuple[bytes | None, ...] = ()

    def feed(self, data: bytes, start: int = 0) -> int:
        raise TypeError("RewritingFrontend is fed with feed_to(data, server)")

    # ------------------------------------------------------------------ the scan

    def feed_to(self, data: bytes, server: ServerStatements | None) -> bytes:
        # The commonest read of all, one whole simple Query of an ordinary statement, skips the
        # general loop and the full session-state scan (session_state.plainly_harmless, inline).
        if data[0] == _Q and len(data) > 8 and not (self._head or self._skip):
            if NATIVE:  # indexing 6-13x cheaper compiled, unpack_header 1.6-1.9x from sources: bench/README
                length = (data[1] << 24) | (data[2] << 16) | (data[3] << 8) | data[4]
            else:
                length = unpack_header(data, 0)[1]
            if (
                length + 1 == len(data)
                and length <= WINDOW + 5
                and not NOT_A_WORD_START[data[5]]
                and (  # session_state.head_key(data, 5), inline
                    (data[5] | 0x20) << 16 | (data[6] | 0x20) << 8 | (data[7] | 0x20)
                )
                not in SUSPECT_HEAD_KEYS
                and (
                    not suspect_text(data, 5, length)
                    if NATIVE  # compiled: loop (2.3x on short texts); sources: regexes (6-18x). bench/README
                    else SUSPECT_FUNCTION.search(data, 5, length) is None
                    and MORE_STATEMENTS.search(data, 5, length) is None
                )
            ):
                self.requests += 1
                if self._counted:
                    self._batch = None
                    self._parses = self._closes = 0
                    self._counted = False
                self.outstanding += 1
                self.open_tail = False
                if self._extended:
                    self._syncs_since_execute = 0
                    self._extended = False
                # FrontendStream._note_statement, inline. The text starts with a word here, and
                # a third letter "l" (SELECT) is no transaction control.
                text = self.last_statement = (
                    data[5:length] if length < 5 + STATEMENT_SAMPLE else data[5 : 5 + STATEMENT_SAMPLE]
                )
                if not self.xact_statement_final:
                    self.xact_statement = text
                    self.xact_statement_final = (
                        data[5] not in CONTROL_FIRST_BYTES
                        or data[7] | 0x20 == _L
                        or not is_transaction_control(text)
                    )
                return data
        return self._rewrite(data, server)

    def _rewrite(self, data: bytes, server: ServerStatements | None) -> bytes:
        carry = self._head
        if carry:
            data = carry + data
            self._head = b""
        end = len(data)
        pos = self._skip
        out: list[bytes] | None = None
        run = 0  # start of the input not yet copied to `out`
        if pos:
            if pos >= end:
                self._skip = pos - end
                dropping = self._dropping
                self._dropping = dropping and pos > end
                return b"" if dropping else data
            self._skip = 0
            if self._dropping:
                self._dropping = False
                out = []
                run = pos
        held = -1  # offset from which input is held back for the next read
        tracking = self.statements is not None and server is not None
        open_tail = self.open_tail  # a local until the loop ends: set by most messages
        # Branches in order of frequency in extended-protocol traffic.
        while end - pos >= 5:
            if NATIVE:  # indexing 6-13x cheaper compiled, unpack_header 1.6-1.9x from sources: bench/README
                msg_type = data[pos]
                length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            else:
                msg_type, length = unpack_header(data, pos)
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length} (message type {msg_type})")
            msg_end = pos + 1 + length
            if msg_type == _P:
                first = not open_tail  # the first message of its batch: no error can skip it
                open_tail = True
                if end - pos < 6:
                    held = pos
                    break
                if data[pos + 5] == 0 or not tracking:
                    # The unnamed statement (or untracked names): the client's own Parse goes
                    # to the server; only its text is scanned.
                    text_start = pos + 6
                    if data[pos + 5]:
                        text_start = data.find(b"\0", pos + 5, min(msg_end, end)) + 1
                        if text_start == 0:
                            if msg_end <= end or end - pos > MAX_NAMES_PREFIX:
                                raise ProtocolViolation("malformed Parse message")
                            held = pos
                            break
                    text_end = max(text_start, min(msg_end - 1, text_start + WINDOW))
                    if text_end > end:
                        held = pos
                        break
                    # Parse texts repeat (they carry $n, not values): remember their verdicts.
                    text = data[text_start:text_end]
                    verdicts = self.verdicts
                    kinds = verdicts.get(text)
                    if kinds is None:
                        kinds = scan_sql(text, self.tracked)
                        if len(verdicts) >= MAX_REMEMBERED_TEXTS:
                            verdicts.clear()
                        verdicts[text] = kinds
                    if (
                        kinds
                        and self.intercept_listen
                        and not (pos or carry)
                        and self._listen_read(kinds, data)
                    ):
                        return b""  # fmt: skip
                    refusal = self._session_state(kinds, server) if kinds else None
                    if refusal is not None:
                        out, run = _splice(out, data, run, pos, min(msg_end, end), self._refusal(refusal))
                        if msg_end > end:
                            self._dropping = True
                    else:
                        self._parses += 1
                        self._counted = True
                        self._note_statement(text[:STATEMENT_SAMPLE])
                        if server is not None:
                            if first:
                                server.unnamed_owner = self
                            else:
                                self._unnamed_batch = self.requests
                else:
                    if msg_end > end:
                        if length > MAX_NAMED_PARSE:
                            raise ProtocolViolation(
                                f"Parse of a named statement of {length} bytes is over pypooler's"
                                f" {MAX_NAMED_PARSE >> 20} MiB limit"
                            )
                        held = pos
                        break
                    assert server is not None
                    out, run = _splice(out, data, run, pos, msg_end,
                                       self._named_parse(data[pos + 5 : msg_end], server))  # fmt: skip
            elif msg_type == _B:
                open_tail = True
                if tracking:
                    if end - pos < 7:
                        held = pos
                        break
                    if data[pos + 5] or data[pos + 6]:  # a named portal or statement
                        portal_end = data.find(b"\0", pos + 5, min(msg_end, end))
                        name_end = -1 if portal_end < 0 else data.find(b"\0", portal_end + 1,
                                                                        min(msg_end, end))  # fmt: skip
                        if name_end < 0:
                            if msg_end <= end or end - pos > MAX_NAMES_PREFIX:
                                raise ProtocolViolation("malformed Bind message")
                            held = pos
                            break
                        if name_end == portal_end + 1:  # a named portal of the unnamed statement
                            assert server is not None
                            if server.unnamed_owner is not self and self._unnamed_batch != self.requests:
                                out, run = _splice(out, data, run, pos, min(msg_end, end), self._no_unnamed())
                                if msg_end > end:
                                    self._dropping = True
                        else:
                            assert server is not None and self.statements is not None
                            name = data[portal_end + 1 : name_end]
                            statement = self.statements.names.get(name)
                            if statement is None and name.startswith(SERVER_NAME_PREFIX):
                                if msg_end > end:
                                    held = pos
                                    break
                                out, run = _splice(out, data, run, pos, msg_end, self._missing(name))
                            elif statement is not None:
                                if (
                                    statement.listen
                                    and self.intercept_listen
                                    and self._listen_bind(data, statement, server, not (pos or carry))
                                ):
                                    return b""
                                prefix = (
                                    self._make_ready(statement, server)
                                    + pack_header(_B, length - (name_end - portal_end - 1)
                                                  + len(statement.name))
                                    + data[pos + 5 : portal_end + 1]
                                    + statement.name
                                )  # fmt: skip
                                # The NUL after the name and the rest of the Bind pass as they are.
                                out, run = _splice(out, data, run, pos, name_end, prefix)
                    elif (
                        server.unnamed_owner is not self  # type: ignore[union-attr]  # tracking: not None
                        and self._unnamed_batch != self.requests
                    ):
                        out, run = _splice(out, data, run, pos, min(msg_end, end), self._no_unnamed())
                        if msg_end > end:
                            self._dropping = True
            elif msg_type == _E:
                open_tail = True
                self._syncs_since_execute = 0
                self._extended = True
            elif msg_type == _S:
                if not self.copy_in:
                    self.requests += 1  # the batch is complete
                    if self._counted:
                        self._batch = None
                        self._parses = self._closes = 0
                        self._counted = False
                    self.outstanding += 1
                    open_tail = False
                    self._syncs_since_execute += 1
            elif msg_type == _D or msg_type == _C:  # noqa: SIM109 (no tuple built per message)
                open_tail = True
                if tracking and end - pos < 7:
                    held = pos
                    break
                if tracking and data[pos + 5] == _STATEMENT:
                    assert server is not None
                    if data[pos + 6]:
                        if msg_end > end:
                            if length > MAX_NAMES_PREFIX:
                                raise ProtocolViolation("malformed Describe or Close message")
                            held = pos
                            break
                        name = data[pos + 6 : msg_end - 1] if length > 5 else b""
                        replacement = self._describe(name, server) if msg_type == _D else self._close(name)
                        if replacement is not None:
                            out, run = _splice(out, data, run, pos, msg_end, replacement)
                        elif msg_type == _C:
                            self._closes += 1
                            self._counted = True
                    elif msg_type == _C:  # of the unnamed statement
                        self._closes += 1
                        self._counted = True
                    elif server.unnamed_owner is not self and self._unnamed_batch != self.requests:
                        out, run = _splice(out, data, run, pos, min(msg_end, end), self._no_unnamed())
                        if msg_end > end:
                            self._dropping = True
                elif msg_type == _C:
                    self._closes += 1
                    self._counted = True
            elif msg_type == _Q:
                text_end = max(pos + 5, min(msg_end - 1, pos + 5 + WINDOW))  # the text, without its NUL
                if text_end > end:
                    held = pos
                    break
                kinds = scan_sql(data[pos + 5 : text_end], self.tracked)
                if kinds and self.intercept_listen:
                    if not (pos or carry) and self._listen_read(kinds, data):
                        return b""
                    if UNLISTEN in kinds:
                        self.unlistens += tuple(unlisten_channels(data[pos + 5 : text_end]))
                        self.noted = True
                text = self.last_statement = data[pos + 5 : min(text_end, pos + 5 + STATEMENT_SAMPLE)]
                if not self.xact_statement_final:
                    self._note_first_statement(text)
                refusal = self._session_state(kinds, server) if kinds else None
                if refusal is not None:
                    # The replacement ends with a Sync, as the Query ended its batch.
                    out, run = _splice(out, data, run, pos, min(msg_end, end),
                                       self._refusal(refusal) + codec.SYNC)  # fmt: skip
                    if msg_end > end:
                        self._dropping = True
                self.requests += 1
                if self._counted:
                    self._batch = None
                    self._parses = self._closes = 0
                    self._counted = False
                self.outstanding += 1
                open_tail = False
                self._syncs_since_execute = 0
                self._extended = False
            elif msg_type == _COPY_DATA or msg_type == _COPY_DONE or msg_type == _COPY_FAIL:  # noqa: SIM109
                if not self.copy_in:
                    self._enter_copy_in()
                if msg_type != _COPY_DATA:
                    self.copy_in = False
            elif msg_type == _X:
                self.open_tail = open_tail
                self.terminated = self.noted = True
                self._skip = 0
                self._dropping = False
                if out is None:
                    return data[:pos]
                out.append(data[run:pos])
                return b"".join(out)
            elif msg_type == _F:
                self.requests += 1  # answered with a ReadyForQuery: the batch is complete
                if self._counted:
                    self._batch = None
                    self._parses = self._closes = 0
                    self._counted = False
                self.outstanding += 1
            else:  # Flush, and anything else: answered at the next Sync
                open_tail = True
            pos = msg_end
        self.open_tail = open_tail
        if pos > end:
            self._skip = pos - end
        elif pos < end and held < 0:
            held = pos  # a header cut short
        limit = end
        if held >= 0:
            self._head = data[held:]
            limit = held
            if data[held] == _P and end - held >= 5:  # a Parse held back is read again later,
                self.open_tail = not first  # from the state before it (see `first`)
        if out is None:
            return data if limit == end else data[:limit]
        if run < limit:
            out.append(data[run:limit])
        return b"".join(out)

    def _listen_read(self, kinds: tuple[str, ...], data: bytes) -> bool:
        """Whether the read `data` is one LISTEN/UNLISTEN for pypooler to answer (then noted in
        `listen_request`): the client has nothing outstanding, so the answer goes in its place."""
        if LISTEN not in kinds and UNLISTEN not in kinds:
            return False
        # At rest before this read (the caller saw to a message boundary): had the client held a
        # server, the release rule (`releasable`) would give it back once this is answered.
        if not self.at_rest:
            return False
        request = listen_request(data)
        if request is None:
            return False
        self.listen_request = request
        self.noted = True
        return True

    def _listen_bind(self, data: bytes, statement: Statement, server: ServerStatements, whole: bool) -> bool:
        """A Bind of the client's named LISTEN/UNLISTEN statement: whether the read is that one
        batch for pypooler to answer (as `_listen_read`). When it is not, the statement goes
        to the server as session state, noted (never refused: its Parse was accepted)."""
        text = statement.key[: max(0, statement.key.find(b"\0"))]
        # At rest, as for `_listen_read`; or at rest but for the tail of an unsynced batch
        # (asyncpg prepares with Parse, Describe, Flush and waits for the answer before it
        # binds) outside a transaction block: that tail is closed below, and the server given
        # back with a Sync of its own (ClientConnection._give_back_unused).
        open_tail_only = self.open_tail and self.status == _TX_IDLE and not (self.outstanding or self.copy_in)
        if whole and (self.at_rest or open_tail_only):
            request = listen_request(data, text)
            if request is not None:
                if self.open_tail:
                    request.sync_server = True
                    self.open_tail = False
                    batch = self._batch
                    if batch is not None and self.batches and self.batches[-1] is batch:
                        self.batches.pop()
                        batch.settle()
                    self._batch = None
                    self._parses = self._closes = 0
                    self._counted = False
                self.listen_request = request
                self.noted = True
                return True
        kinds = scan_sql(text[:WINDOW], self.tracked)
        if kinds:
            refuse, self.refuse = self.refuse, False
            self._session_state(kinds, server)
            self.refuse = refuse
        return False

    def _enter_copy_in(self) -> None:
        before = self.outstanding
        super()._enter_copy_in()
        # The Syncs the server ignored in copy-in mode end no batch either.
        self.requests -= before - self.outstanding

    # ------------------------------------------------------------------ the reply plan

    def _current_batch(self) -> Batch:
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch(self.requests + 1)
            if self.batches is None:
                self.batches = deque()
            self.batches.append(batch)
            self._counted = True
        return batch

    def _expect_parse(self, reply: PendingReply) -> None:
        batch = self._current_batch()
        batch.parses[self._parses] = reply
        batch.replies.append(reply)
        self._parses += 1
        self._counted = True

    def _expect_close(self, reply: PendingReply) -> None:
        batch = self._current_batch()
        batch.closes[self._closes] = reply
        batch.replies.append(reply)
        self._closes += 1
        self._counted = True

    # ------------------------------------------------------------------ named statements

    def _make_ready(self, statement: Statement, server: ServerStatements) -> bytes:
        """Messages that make `server` have `statement` before the client's message uses it."""
        number = self._current_batch().number
        if server.has(statement, number):
            return b""
        injected = []
        for old in server.add(statement, number):
            injected.append(old.close)
            self._expect_close(PendingReply(swallow=True))
        injected.append(statement.close)
        self._expect_close(PendingReply(swallow=True))
        injected.append(statement.parse)
        self._expect_parse(PendingReply(
            swallow=True,
            confirm=lambda: server.confirm(statement, number),
            undo=lambda: server.undo(statement, number),
        ))  # fmt: skip
        return b"".join(injected)

    def _named_parse(self, body: bytes, server: ServerStatements) -> bytes:
        statements = self.statements
        assert statements is not None
        name_end = body.find(b"\0")
        if name_end < 0:
            raise ProtocolViolation("malformed Parse message")
        name = body[:name_end]
        key = body[name_end + 1 :]
        kinds = scan_sql(key[: min(WINDOW, max(0, key.find(b"\0")))], self.tracked)
        if (
            kinds
            and self.intercept_listen
            and (LISTEN in kinds or UNLISTEN in kinds)
            and parse_listen_statement(key[: max(0, key.find(b"\0"))]) is not None
        ):
            kinds = ()  # preparing it is harmless: its Bind is answered by pypooler (_listen_bind)
        refusal = self._session_state(kinds, server) if kinds else None
        if refusal is not None:
            return self._refusal(refusal)
        text_end = key.find(b"\0")
        self._note_statement(key[: min(STATEMENT_SAMPLE, text_end if text_end >= 0 else len(key))])
        if name in statements.names:
            # PostgreSQL parses and analyzes the text before it finds the name taken, so a
            # broken text gets its own error first: parse it as the unnamed statement (which
            # the skip to Sync after the error leaves to nobody), then refuse.
            self._expect_parse(PendingReply(swallow=True))
            self._lose_unnamed(server)
            return codec.build_parse(b"", key) + self._refusal(DuplicatePreparedStatement(
                f'prepared statement "{name.decode("utf-8", "replace")}" already exists'
            ))  # fmt: skip
        statement = statements.add(name, key)
        number = self._current_batch().number

        def forget() -> None:  # the Parse failed: the client does not have the statement
            statements.drop(name, statement)

        if server.has(statement, number):
            if self.status == _TX_FAILED:
                # In a failed transaction block PostgreSQL refuses the Parse; the unnamed
                # statement gets the same refusal, and a ParseComplete if the block was rolled
                # back meanwhile (the skip to Sync after the error leaves it to nobody).
                self._expect_parse(PendingReply(undo=forget))
                self._lose_unnamed(server)
                return codec.build_parse(b"", key)
            self._expect_close(PendingReply(replacement=codec.PARSE_COMPLETE, undo=forget))
            return PLACEHOLDER_CLOSE
        injected = []
        for old in server.add(statement, number):
            injected.append(old.close)
            self._expect_close(PendingReply(swallow=True))
        injected.append(statement.close)
        self._expect_close(PendingReply(swallow=True))
        injected.append(statement.parse)

        def undo() -> None:
            server.undo(statement, number)
            forget()

        self._expect_parse(PendingReply(confirm=lambda: server.confirm(statement, number), undo=undo))
        return b"".join(injected)

    def _describe(self, name: bytes, server: ServerStatements) -> bytes | None:
        assert self.statements is not None
        statement = self.statements.names.get(name)
        if statement is None:
            # Unknown: the server answers with its own error, unless the name could mean one
            # of pypooler's statements there.
            return self._missing(name) if name.startswith(SERVER_NAME_PREFIX) else None
        return (
            self._make_ready(statement, server)
            + pack_header(_D, 4 + 1 + len(statement.name) + 1)
            + b"S"
            + statement.name
            + b"\0"
        )

    def _close(self, name: bytes) -> bytes | None:
        statements = self.statements
        assert statements is not None
        statement = statements.take(name)
        if statement is None:
            # Not one of the client's: a no-op on the server too, unless the name could mean one
            # of pypooler's statements there, which must not be closed.
            if name.startswith(SERVER_NAME_PREFIX):
                self._expect_close(PendingReply())
                return PLACEHOLDER_CLOSE
            return None
        self._expect_close(PendingReply(
            confirm=lambda: statements.registry.release(statement),
            undo=lambda: statements.put_back(name, statement),
        ))  # fmt: skip
        return PLACEHOLDER_CLOSE

    # ------------------------------------------------------------------ session state

    def _session_state(
        self, kinds: tuple[str, ...], server: ServerStatements | None
    ) -> SessionStateRefused | None:
        """Note what a statement does to the session; the error to answer it with, if refused."""
        refusal = None
        for kind in kinds:
            if kind in LEAK_KINDS:
                self.session_state += (kind,)
                self.noted = True
                if self.refuse and refusal is None:
                    refusal = SessionStateRefused(
                        f"pypooler refused a statement that leaves session state ({kind}): "
                        f"{EXPLANATIONS[kind]}, where the next client using it would inherit it",
                        hint=f"{HINTS[kind]}; session_state_policy is 'error'",
                    )
        if refusal is not None:
            return refusal
        for kind in kinds:
            if kind == DISCARD_ALL or kind == DEALLOCATE_ALL:  # noqa: SIM109
                # Both fail in a failed transaction block, and DISCARD ALL in any block. Where
                # that cannot be known yet (pipelined), forget: that costs a Parse, while
                # believing wrongly would cost an error.
                status = self.status
                if status == _TX_FAILED or (kind == DISCARD_ALL and status != _TX_IDLE):
                    continue
                if self.statements is not None:
                    self.statements.clear()
                if server is not None:
                    server.clear()
                self.reset_seen = self.noted = True
                self.settings_reset = self.settings_reset or kind == DISCARD_ALL
                self.discarded = self.discarded or kind == DISCARD_ALL
            elif kind == RESET:
                self.reset_seen = self.settings_reset = self.noted = True
            elif kind == SCHEMA_CHANGE:
                # At once, not at commit: a Parse of a text the change touches waits for the
                # change's lock, so it cannot be analysed against the old schema.
                if self.statements is not None:
                    self.statements.registry.schema.changed()
            elif kind in LEAK_KINDS:
                self.reset_seen = self.noted = True
        return None

    def _lose_unnamed(self, server: ServerStatements) -> None:
        """pypooler sends a Parse of the unnamed statement for its own ends: whatever the server
        holds as the unnamed statement after it, nobody may use without parsing again."""
        server.unnamed_owner = None
        self._unnamed_batch = -1

    def _no_unnamed(self) -> bytes:
        """A client uses the unnamed statement without having made the server's: it may be another
        client's (see ServerStatements.unnamed_owner), so PostgreSQL's error is the answer."""
        return self._refusal(UndefinedPreparedStatement("unnamed prepared statement does not exist"))

    def _missing(self, name: bytes) -> bytes:
        return self._refusal(UndefinedPreparedStatement(
            f'prepared statement "{name.decode("utf-8", "replace")}" does not exist'
        ))  # fmt: skip

    def _refusal(self, error: PoolerError) -> bytes:
        """A placeholder whose CloseComplete becomes `error`, then a Describe that fails."""
        self._expect_close(PendingReply(replacement=error.to_error_response(), fail_next=True))
        return PLACEHOLDER_CLOSE + FAILING_DESCRIBE


def _splice(
    out: list[bytes] | None, data: bytes, run: int, start: int, stop: int, replacement: bytes
) -> tuple[list[bytes], int]:
    """Output so far plus `replacement` instead of data[start:stop]; returns (out, new run)."""
    if out is None:
        out = []
    if run < start:
        out.append(data[run:start])
    if replacement:
        out.append(replacement)
    return out, stop


class RewritingBackend(BackendStream):
    """Server -> client in transaction/statement mode; see the module docstring.

    `feed` keeps BackendStream's contract, with offsets in the bytes to forward: when those
    differ from the bytes received, they are in `replaced` (the caller takes and clears it).
    ParameterStatus messages are passed to `on_parameter_status` (and still forwarded). An
    ErrorResponse reporting a stale plan moves `schema` on (see prepared.py).
    """

    # The held-back start of a message is BackendStream's `_head`, so the client's boundary
    # test reads the same attributes whichever stream a server has.
    __slots__ = ("_closes", "_dropping", "_fail_next", "_parses", "internal", "on_parameter_status", "schema")

    def __init__(
        self,
        on_parameter_status: Callable[[str, str], None] | None = None,
        schema: SchemaVersion | None = None,
    ) -> None:
        super().__init__()
        self.on_parameter_status = on_parameter_status
        self.schema = schema
        self._dropping = False
        self._parses = 0  # ParseComplete messages since the last ReadyForQuery
        self._closes = 0  # CloseComplete messages since the last ReadyForQuery
        self._fail_next = False  # drop the next ErrorResponse (a refusal's failing Describe)
        self.internal = 0  # replies to pypooler's own Queries still to drop, before the client's

    def feed(self, data: bytes, frontend: FrontendStream, start: int = 0) -> int:
        # `start` is always 0 here (BackendStream uses it internally).
        # Not typing.cast: that is a function call on every read.
        stream: RewritingFrontend = frontend  # type: ignore[assignment]
        if self._head or self._dropping or self.internal or self._fail_next or stream.batches:
            return self._rewrite(data, stream)
        # Nothing to drop or replace can come in this read (those need one of the above), so
        # it is forwarded as received, unless a message must be held back: then the general
        # loop takes over where this one stopped.
        end = len(data)
        pos = self._skip
        if pos:
            if pos >= end:
                self._skip = pos - end
                return -1
            self._skip = 0
        done = -1
        while end - pos >= 5:
            if NATIVE:  # indexing 6-13x cheaper compiled, unpack_header 1.6-1.9x from sources: bench/README
                msg_type = data[pos]
                length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            else:
                msg_type, length = unpack_header(data, pos)
            if _WATCHED[msg_type]:  # one test for the rows, descriptions and tags in between
                if msg_type == _Z:
                    if length != 5:
                        raise ProtocolViolation(f"server sent ReadyForQuery of length {length}")
                    if end - pos < 6:
                        break
                    status = self.tx_status = data[pos + 5]
                    stream.status = status
                    stream.copy_in = False
                    if self._parses or self._closes:
                        self._parses = self._closes = 0
                    outstanding = stream.outstanding
                    if outstanding:
                        outstanding -= 1
                        stream.outstanding = outstanding
                    if not outstanding:
                        done = pos + 6
                elif msg_type == _PARSE_COMPLETE:
                    self._parses += 1
                elif msg_type == _CLOSE_COMPLETE:
                    self._closes += 1
                else:  # ParameterStatus or ErrorResponse
                    if length < 4:
                        raise ProtocolViolation(f"server sent invalid message length {length}")
                    if pos + 1 + length > end:
                        break
                    if msg_type == _ERROR:
                        self._error(data[pos + 5 : pos + 1 + length])
                    else:
                        self._parameter_status(data[pos + 5 : pos + 1 + length])
            elif length < 4:
                raise ProtocolViolation(f"server sent invalid message length {length}")
            pos += 1 + length
        if pos > end:
            self._skip = pos - end
        elif pos < end:
            return self._rewrite(data, stream, pos, done)
        return done

    def _rewrite(self, data: bytes, frontend: RewritingFrontend, start: int = -1, done: int = -1) -> int:
        """The general loop; `start` >= 0 continues the fast one at that offset of `data`."""
        out: list[bytes] | None = None
        run = 0
        delta = 0  # output offset minus input offset, after what was dropped or replaced
        carry = b""
        if start >= 0:
            pos = start
            end = len(data)
        else:
            carry = self._head
            if carry:
                data = carry + data
                self._head = b""
            end = len(data)
            pos = self._skip
            if pos:
                if pos >= end:
                    self._skip = pos - end
                    if self._dropping:
                        self._dropping = pos > end
                        self.replaced = b""
                    elif carry:
                        self.replaced = data
                    return -1
                self._skip = 0
                if self._dropping:
                    self._dropping = False
                    out = []
                    run = pos
                    delta = -pos
        held = -1
        while True:
            if end - pos < 5:
                if pos < end:
                    held = pos
                break
            if NATIVE:  # indexing 6-13x cheaper compiled, unpack_header 1.6-1.9x from sources: bench/README
                msg_type = data[pos]
                length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            else:
                msg_type, length = unpack_header(data, pos)
            msg_end = pos + 1 + length
            drop = False
            replacement = None
            if msg_type == _Z:
                if length != 5:
                    raise ProtocolViolation(f"server sent ReadyForQuery of length {length}")
                if end - pos < 6:
                    held = pos
                    break
                if self.internal:
                    self.internal -= 1
                    drop = True
                else:
                    frontend.status = self.tx_status = data[pos + 5]
                    frontend.copy_in = False
                    batches = frontend.batches
                    if batches and batches[0].number == frontend.requests - frontend.outstanding + 1:
                        batches.popleft().settle()
                    self._parses = 0
                    self._closes = 0
                    self._fail_next = False
                    if frontend.outstanding:
                        frontend.outstanding -= 1
                    if not frontend.outstanding:
                        done = msg_end + delta
            elif length < 4:
                raise ProtocolViolation(f"server sent invalid message length {length}")
            elif self.internal:
                drop = True
                if msg_type == _PARAMETER_STATUS or msg_type == _ERROR:  # noqa: SIM109
                    if msg_end > end:
                        held = pos
                        break
                    body = data[pos + 5 : msg_end]
                    if msg_type == _ERROR:
                        if self.internal_error is None:
                            self.internal_error = codec.parse_error_fields(body)
                    else:
                        self._parameter_status(body)
            elif msg_type == _PARSE_COMPLETE or msg_type == _CLOSE_COMPLETE:  # noqa: SIM109
                if msg_type == _PARSE_COMPLETE:
                    index = self._parses
                    self._parses += 1
                else:
                    index = self._closes
                    self._closes += 1
                batches = frontend.batches
                if batches and batches[0].number == frontend.requests - frontend.outstanding + 1:
                    batch = batches[0]
                    reply = (batch.parses if msg_type == _PARSE_COMPLETE else batch.closes).pop(index, None)
                    if reply is not None:
                        reply.replied = True
                        if reply.confirm is not None:
                            reply.confirm()
                        drop = reply.swallow
                        replacement = reply.replacement
                        if reply.fail_next:
                            self._fail_next = True
            elif msg_type == _PARAMETER_STATUS:
                if msg_end > end:
                    held = pos
                    break
                self._parameter_status(data[pos + 5 : msg_end])
            elif msg_type == _ERROR:
                if self._fail_next:
                    self._fail_next = False
                    drop = True
                else:
                    if msg_end > end:
                        held = pos
                        break
                    self._error(data[pos + 5 : msg_end])
            if drop or replacement is not None:
                stop = min(msg_end, end)
                out, run = _splice(out, data, run, pos, stop, replacement or b"")
                delta += (len(replacement) if replacement else 0) - (stop - pos)
                if msg_end > end:
                    self._dropping = True
            pos = msg_end
        if pos > end:
            self._skip = pos - end
        limit = end
        if held >= 0:
            self._head = data[held:]
            limit = held
        if out is None:
            if limit != end or carry:
                self.replaced = data[:limit]
            return done
        if run < limit:
            out.append(data[run:limit])
        self.replaced = b"".join(out)
        return done

    def _error(self, body: bytes) -> None:
        """An ErrorResponse for the client (rare: off the per-message path)."""
        if body[:7] in FATAL_STARTS:
            self.fatal = True
        elif self.schema is not None and is_stale_plan(codec.parse_error_fields(body)):
            self.schema.changed()

    def abandon_batch(self) -> None:
        """The client's open batch ends elsewhere (its server is given back with pypooler's own
        Sync, see ClientConnection._give_back_unused): the reply counts start again."""
        self._parses = self._closes = 0
        self._fail_next = False

    def _parameter_status(self, body: bytes) -> None:
        if self.on_parameter_status is not None:
            name, value = codec.parse_parameter_status(body)
            self.on_parameter_status(name, value)
