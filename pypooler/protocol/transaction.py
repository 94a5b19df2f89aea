"""Follows a linked client/server byte stream just enough to know when a transaction ends.

This is the forwarding hot path, so its rules are strict:
- Bytes are never copied or buffered: `feed` only reads message headers in place and the caller
  forwards the very `bytes` object it was given. A message body the tracker does not need is
  skipped by arithmetic (`_skip`), so a 1 GB DataRow costs what its 5-byte header costs.
- Only a header split across two reads is kept (`_head`, at most 5 bytes), and completed from the
  next read without rescanning anything.
- What is inspected: on the client side, the message type (to count Query/Sync/FunctionCall, spot
  Terminate and COPY data); on the server side, ReadyForQuery and its status byte.

Transaction end, as the pool needs it: the server sends ReadyForQuery while nothing the client sent
still awaits one (`outstanding == 0`), and the client has not begun a new extended-protocol batch
since its last Sync (`open_tail`): a pipelined client may have Parse/Bind/Execute in flight that the
server will answer only after the next Sync, and that server must not go to another client.

The release rule (`releasable`) lives here, and only here: every place that gives a server back
(the end of a transaction, a client leaving, a LISTEN pypooler answered itself, a drain deciding
whether a session is between transactions) asks it, and tests call it rather than restate it.
The streams expose what it reads as public properties (`at_rest`, `at_message_boundary`,
`tx_status`); nobody outside this module reads `_head` or `_skip`. A server pypooler drove itself
(settings, server_reset_query, auth_query), with no client stream in between, is judged by
`releasable_after_internal` from its last ReadyForQuery.

COPY FROM STDIN started by an extended-protocol Execute: the server ignores Sync messages it receives
in copy-in mode (libpq sends one right after the Execute, and another after CopyDone). Those Syncs
will never get a ReadyForQuery, so when copy data first appears we take back the Syncs counted since
the Execute, and we do not count Syncs until CopyDone/CopyFail.
"""

from __future__ import annotations

from typing import Final

from pypooler.protocol import constants as c
from pypooler.protocol.codec import NATIVE, unpack_header
from pypooler.protocol.errors import ProtocolViolation

_Q: Final = c.F_QUERY
_S: Final = c.F_SYNC
_E: Final = c.F_EXECUTE
_F: Final = c.F_FUNCTION_CALL
_X: Final = c.F_TERMINATE
_COPY_DATA: Final = c.F_COPY_DATA
_COPY_DONE: Final = c.F_COPY_DONE
_COPY_FAIL: Final = c.F_COPY_FAIL
_Z: Final = c.B_READY_FOR_QUERY
_TX_IDLE: Final = c.TX_IDLE
_IDLE_BODY: Final = bytes((c.TX_IDLE,))  # a ReadyForQuery's body when the server is idle
_ERROR: Final = c.B_ERROR_RESPONSE
# How an ErrorResponse that ends the server's connection starts: its severity field first, as
# PostgreSQL always sends it.
FATAL_STARTS: Final = frozenset({b"SFATAL\0", b"SPANIC\0"})
_P: Final = c.F_PARSE
STATEMENT_SAMPLE: Final = 256  # bytes of statement text kept per statement
# Statements that say nothing about what a transaction does (lower-case prefixes).
_TRANSACTION_CONTROL: Final = (b"begin", b"start", b"set ", b"savepoint", b"\n", b" ")
CONTROL_FIRST_BYTES: Final = frozenset(b"bBsS \n\t")


def is_transaction_control(text: bytes) -> bool:
    """Whether a statement's text (its first bytes) is BEGIN, START, SET, SAVEPOINT or blank."""
    return text[:10].lower().startswith(_TRANSACTION_CONTROL)


class FrontendStream:
    """Client -> server direction."""

    __slots__ = (
        "_extended",
        "_head",
        "_skip",
        "_syncs_since_execute",
        "copy_in",
        "last_statement",
        "open_tail",
        "outstanding",
        "xact_statement",
        "xact_statement_final",
    )

    def __init__(self) -> None:
        self._skip = 0  # bytes of the current message body still to pass
        self._head = b""  # a message header cut short by the end of the last read
        self.outstanding = 0  # Query/Sync/FunctionCall messages still awaiting ReadyForQuery
        self.open_tail = False  # extended-protocol messages sent since the last Sync
        self.copy_in = False
        self._syncs_since_execute = 0
        self._extended = False  # was the latest Execute more recent than the latest Query?
        # The start of the latest Query/Parse text, and the first one of the current transaction
        # that is not transaction control (the client takes and clears it when the hold ends):
        # for statement stats and SHOW HOLDERS. At most STATEMENT_SAMPLE bytes, per statement.
        self.last_statement = b""
        self.xact_statement: bytes | None = None
        self.xact_statement_final = False  # xact_statement is not transaction control

    @property
    def at_rest(self) -> bool:
        """Nothing sent by the client is pending on the server: no request awaiting its
        ReadyForQuery, no open extended-protocol tail, not in COPY FROM STDIN, and the client's
        stream is at a message boundary."""
        if self.outstanding or self.open_tail or self.copy_in or self._head or self._skip:  # noqa: SIM103
            return False  # an `if`, as in `releasable`: no boxing when compiled
        return True

    @property
    def at_message_boundary(self) -> bool:
        """No client message is half forwarded (a cut header kept, or a body still passing)."""
        if self._skip or self._head:  # noqa: SIM103 (an `if`, as in `releasable`)
            return False
        return True

    def _complete_head(self, data: bytes) -> int:
        """feed() when the last read ended inside a message header."""
        head = self._head
        need = 5 - len(head)
        if len(data) < need:
            self._head = head + data
            return -1
        self._head = b""
        terminate = self.feed(head + data[:need])
        if terminate >= 0:
            # Part of the Terminate already went to the server: it is no longer clean.
            self.open_tail = True
            return 0
        return self.feed(data, need)

    def feed(self, data: bytes, start: int = 0) -> int:
        """Account for client bytes; return the offset of a Terminate message, or -1."""
        if self._head:
            return self._complete_head(data)
        end = len(data)
        pos = start + self._skip
        if pos > end:
            self._skip = pos - end
            return -1
        while end - pos >= 5:
            if NATIVE:  # indexing 6-13x cheaper compiled, unpack_header 1.6-1.9x from sources: bench/README
                msg_type = data[pos]
                length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            else:
                msg_type, length = unpack_header(data, pos)
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length} (message type {msg_type})")
            if msg_type == _Q:
                self.outstanding += 1
                self.open_tail = False
                self._syncs_since_execute = 0
                self._extended = False
                # The text ends one byte before the message (its NUL terminator). (Never a slice
                # that ends before it starts: compiled, mypyc's bytes slice does not clamp those.)
                text = self.last_statement = (
                    data[pos + 5 : pos + min(length, 5 + STATEMENT_SAMPLE)] if length > 5 else b""
                )
                if not self.xact_statement_final:
                    self._note_first_statement(text)
            elif msg_type == _S:
                if not self.copy_in:
                    self.outstanding += 1
                    self.open_tail = False
                    self._syncs_since_execute += 1
            elif msg_type == _E:
                self.open_tail = True
                self._syncs_since_execute = 0
                self._extended = True
            elif msg_type == _COPY_DATA or msg_type == _COPY_DONE or msg_type == _COPY_FAIL:  # noqa: SIM109 (no tuple built per message)
                if not self.copy_in:
                    self._enter_copy_in()
                if msg_type != _COPY_DATA:
                    self.copy_in = False
            elif msg_type == _X:
                self._skip = 0
                return pos
            elif msg_type == _F:
                self.outstanding += 1
            else:  # Parse, Bind, Describe, Close, Flush: answered at the next Sync
                self.open_tail = True
                if msg_type == _P:
                    # Skip the statement name to reach the query text.
                    name_end = data.find(b"\0", pos + 5, pos + 1 + length)
                    if name_end >= 0:
                        text = data[name_end + 1 : min(pos + 1 + length, name_end + 1 + STATEMENT_SAMPLE)]
                        nul = text.find(b"\0")
                        self._note_statement(text[:nul] if nul >= 0 else text)
            pos += 1 + length
        if pos > end:
            self._skip = pos - end
        else:
            self._skip = 0
            if pos < end:
                self._head = data[pos:]
        return -1

    def _note_statement(self, text: bytes) -> None:
        self.last_statement = text
        if not self.xact_statement_final:
            self._note_first_statement(text)

    def _note_first_statement(self, text: bytes) -> None:
        self.xact_statement = text
        # Most statements fail the one-byte test; only b/s/blank ones get the full look.
        self.xact_statement_final = not (
            text and text[0] in CONTROL_FIRST_BYTES and is_transaction_control(text)
        )

    def _enter_copy_in(self) -> None:
        self.copy_in = True
        if self._extended:
            # The server ignored these Syncs in copy-in mode; no ReadyForQuery will answer them.
            self.outstanding = max(0, self.outstanding - self._syncs_since_execute)
            self._syncs_since_execute = 0


class BackendStream:
    """Server -> client direction."""

    __slots__ = ("_head", "_skip", "fatal", "internal_error", "replaced", "tx_status")

    def __init__(self) -> None:
        self._skip = 0
        self._head = b""
        self.tx_status = c.TX_IDLE  # status byte of the latest ReadyForQuery
        # A FATAL (or PANIC) ErrorResponse was forwarded to the client: the server's connection
        # ends, and the client must not get a second FATAL of pypooler's for that end.
        self.fatal = False
        # Always None here: a subclass that rewrites the stream puts the bytes to forward in
        # `replaced`, and the fields of an error in its own queries' replies in `internal_error`.
        self.replaced: bytes | None = None
        self.internal_error: dict[str, str] | None = None

    @property
    def at_message_boundary(self) -> bool:
        """No server message is half forwarded (a cut header kept, or a body still passing)."""
        if self._skip or self._head:  # noqa: SIM103 (an `if`, as in `releasable`)
            return False
        return True

    def _complete_head(self, data: bytes, frontend: FrontendStream) -> int:
        """feed() when the last read ended inside a message header."""
        head = self._head
        need = (6 if head[0] == _Z else 5) - len(head)
        if len(data) < need:
            head = self._head = head + data
            if len(head) == 5 and unpack_header(head)[1] != 5:  # a ReadyForQuery header
                raise ProtocolViolation(f"server sent ReadyForQuery of length {unpack_header(head)[1]}")
            return -1
        self._head = b""
        first = self.feed(head + data[:need], frontend)
        rest = self.feed(data, frontend, need)
        if rest >= 0:
            return rest
        return first - len(head) if first >= 0 else -1

    def feed(self, data: bytes, frontend: FrontendStream, start: int = 0) -> int:
        """Account for server bytes.

        Returns the offset just past the last ReadyForQuery in `data` that answered the client's
        last outstanding request, or -1. `tx_status` then holds the status of the latest one.
        """
        if self._head:
            return self._complete_head(data, frontend)
        end = len(data)
        pos = start + self._skip
        if pos > end:
            self._skip = pos - end
            return -1
        done = -1
        while end - pos >= 5:
            if NATIVE:  # indexing 6-13x cheaper compiled, unpack_header 1.6-1.9x from sources: bench/README
                msg_type = data[pos]
                length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            else:
                msg_type, length = unpack_header(data, pos)
            if msg_type == _Z:
                if length != 5:
                    # Its status byte would be read from the next message, and the header
                    # completed across reads would keep stray bytes as a partial header.
                    raise ProtocolViolation(f"server sent ReadyForQuery of length {length}")
                if end - pos < 6:
                    break  # the status byte is in the next read
                self.tx_status = data[pos + 5]
                # A server that failed a simple-query COPY FROM answers at once; the client may
                # still send CopyData/CopyDone, which PostgreSQL ignores outside copy mode.
                frontend.copy_in = False
                if frontend.outstanding:
                    frontend.outstanding -= 1
                if not frontend.outstanding:
                    done = pos + 6
            elif length < 4:
                raise ProtocolViolation(f"server sent invalid message length {length}")
            elif msg_type == _ERROR and data[pos + 5 : pos + 12] in FATAL_STARTS:
                self.fatal = True
            pos += 1 + length
        if pos > end:
            self._skip = pos - end
        else:
            self._skip = 0
            if pos < end:
                self._head = data[pos:]
        return done


def releasable(frontend: FrontendStream, backend: BackendStream, *, keeps_server: bool = False) -> bool:
    """The release rule: whether the server behind `backend` may go back to the pool now.

    It may when the transaction is over and nothing of either direction is in flight:
    - the server's latest ReadyForQuery said idle ('I'): not in a transaction block, not in a
      failed one;
    - the client is at rest (`FrontendStream.at_rest`): nothing outstanding, no open
      extended-protocol tail, not in COPY FROM STDIN, at a message boundary;
    - the server's stream is at a message boundary: the next borrower must not get the rest of a
      message meant for this client;
    - and the client does not keep its server between transactions (`keeps_server`: session
      mode, or a client pinned by session_state_policy = "pin"). Such a server goes back only
      when its client leaves, after `server_reset_query`: ask again then with the default.

    What happens to a releasable server is the pool's business (Pool.release): handed to the
    first waiter, kept until a CancelRequest in flight is delivered, closed while draining.
    """
    # `at_rest` and both `at_message_boundary` tests, read as fields (this module owns them): the
    # rule runs once per transaction, and the property calls cost more than the tests. An `if`,
    # not `return not (...)`: compiled, a `return` of an `or` of ints, bools and bytes boxes them
    # into one object and asks its truth, where an `if` branches on each test.
    if (  # noqa: SIM103 (see above)
        keeps_server
        or backend.tx_status != _TX_IDLE
        or frontend.outstanding or frontend.open_tail or frontend.copy_in or frontend._head or frontend._skip
        or backend._head or backend._skip
    ):  # fmt: skip
        return False
    return True


def backend_busy(frontend: FrontendStream) -> bool:
    """Whether the server behind a client that stopped here may be running one of its requests:
    one awaits its ReadyForQuery, an extended-protocol tail (an Execute runs before its Sync) or
    COPY FROM STDIN is open. Such a server is cancelled as it is closed (Pool.give_back)."""
    return bool(frontend.outstanding or frontend.open_tail or frontend.copy_in)


def releasable_after_internal(ready_for_query: bytes) -> bool:
    """The release rule for a server pypooler drove itself (session settings, server_reset_query,
    a LISTEN's unused server, auth_query, a spelling check): its internal reader consumed every
    reply up to this ReadyForQuery (`ready_for_query` is its body, the status byte), so both
    directions are at a boundary and nothing is outstanding; only the status remains to ask."""
    return ready_for_query == _IDLE_BODY
