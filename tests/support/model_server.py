"""A tiny model of how PostgreSQL answers the messages that matter to prepared-statement tracking.

It keeps prepared statements by name, skips to Sync after an error in the extended protocol,
refuses most messages in a failed transaction block, and answers with real protocol messages, so
tests can compare what a client sees through pypooler's streams with what it would see on a
direct connection (its own model server). It is deliberately small; the integration tests run
the same ideas against a real PostgreSQL.

Query texts it understands: BEGIN, COMMIT, ROLLBACK, FAIL... (an error), DEALLOCATE ALL,
DISCARD ALL, and anything else (a command tagged SELECT 1). A Parse whose text contains FAIL
fails; an Execute of a statement whose text contains EXECFAIL fails.
"""

from __future__ import annotations

import struct

from pypooler.protocol import codec, errors
from pypooler.protocol import constants as c
from tests.support.messages import BIND_COMPLETE, NO_DATA

ABORTED = "current transaction is aborted, commands ignored until end of transaction block"


class ModelServer:
    # PostgreSQL keeps the unnamed statement after Sync, but no pooler can (the next batch may
    # run on another server) and no driver relies on it; so the model drops it at Sync.
    def __init__(self) -> None:
        self.statements: dict[bytes, bytes] = {}  # name -> text and parameter types
        self.portals: dict[bytes, bytes] = {}  # name -> the statement's text
        self._reader = codec.MessageReader(max_message=1 << 30)
        self.skipping = False
        self.status = c.TX_IDLE
        self.received: list[tuple[int, bytes]] = []

    def receive(self, data: bytes) -> bytes:
        replies = []
        for msg_type, body in self._reader.feed(data):
            self.received.append((msg_type, body))
            replies.append(self._message(msg_type, body))
        return b"".join(replies)

    # ------------------------------------------------------------------ messages

    def _message(self, msg_type: int, body: bytes) -> bytes:
        if msg_type == c.F_QUERY:
            return self._query(body[:-1])
        if msg_type == c.F_SYNC:
            self.skipping = False
            self.statements.pop(b"", None)
            if self.status == c.TX_IDLE:
                self.portals.clear()
            return codec.build_ready_for_query(self.status)
        if self.skipping or msg_type in (c.F_FLUSH, c.F_TERMINATE):
            return b""
        if msg_type == c.F_PARSE:
            name, pos = _cstring(body, 0)
            text, _ = _cstring(body, pos)
            if self.status == c.TX_FAILED and text not in (b"ROLLBACK", b"COMMIT"):
                return self._error("25P02", ABORTED)
            if b"FAIL" in text and b"EXECFAIL" not in text:
                return self._error("42601", "syntax error")
            if name and name in self.statements:
                return self._error("42P05", f'prepared statement "{name.decode()}" already exists')
            self.statements[name] = body[pos:]
            return codec.PARSE_COMPLETE
        if msg_type == c.F_BIND:
            portal, pos = _cstring(body, 0)
            name, _ = _cstring(body, pos)
            if name not in self.statements:  # looked up before the aborted check, as PostgreSQL does
                return self._missing(name)
            if self.status == c.TX_FAILED:
                return self._error("25P02", ABORTED)
            self.portals[portal] = self.statements[name]
            return BIND_COMPLETE
        if msg_type == c.F_DESCRIBE:
            name, _ = _cstring(body, 1)
            if body[0] == ord("S"):
                if name not in self.statements:
                    return self._missing(name)
                if self.status == c.TX_FAILED:
                    return self._error("25P02", ABORTED)
                return codec.build_message(c.B_PARAMETER_DESCRIPTION, struct.pack("!h", 0)) + NO_DATA
            return NO_DATA
        if msg_type == c.F_EXECUTE:
            portal, _ = _cstring(body, 0)
            if portal not in self.portals:
                return self._error("34000", f'portal "{portal.decode()}" does not exist')
            text = self.portals[portal].split(b"\0")[0]
            if b"EXECFAIL" in text:
                return self._error("22012", "division by zero")
            if text.upper() in (b"DEALLOCATE ALL", b"DISCARD ALL"):
                self.statements.clear()
                return codec.build_command_complete(text.upper().decode())
            return codec.build_command_complete("SELECT 1")
        if msg_type == c.F_CLOSE:
            name, _ = _cstring(body, 1)
            if body[0] == ord("S"):
                self.statements.pop(name, None)
            else:
                self.portals.pop(name, None)
            return codec.CLOSE_COMPLETE
        raise AssertionError(f"model server cannot answer {chr(msg_type)!r}")

    def _query(self, text: bytes) -> bytes:
        upper = text.upper()
        if self.status == c.TX_FAILED and upper not in (b"ROLLBACK", b"COMMIT"):
            error = self._error("25P02", ABORTED)
            self.skipping = False  # a simple Query does not skip to Sync
            return error + codec.build_ready_for_query(self.status)
        if upper == b"BEGIN":
            self.status = c.TX_IN_TRANSACTION
            tag = "BEGIN"
        elif upper in (b"COMMIT", b"ROLLBACK"):
            tag = "ROLLBACK" if upper == b"ROLLBACK" or self.status == c.TX_FAILED else "COMMIT"
            self.status = c.TX_IDLE
            self.portals.clear()
        elif upper.startswith(b"FAIL"):
            error = self._error("42601", "syntax error")
            self.skipping = False  # a simple Query does not skip to Sync
            return error + codec.build_ready_for_query(self.status)
        elif upper in (b"DEALLOCATE ALL", b"DISCARD ALL"):
            if upper == b"DISCARD ALL" and self.status != c.TX_IDLE:
                error = self._error("25001", "DISCARD ALL cannot run inside a transaction block")
                self.skipping = False
                return error + codec.build_ready_for_query(self.status)
            self.statements.clear()
            tag = upper.decode()
        else:
            tag = "SELECT 1"
        return codec.build_command_complete(tag) + codec.build_ready_for_query(self.status)

    def _missing(self, name: bytes) -> bytes:
        if not name:
            return self._error("26000", "unnamed prepared statement does not exist")
        return self._error("26000", f'prepared statement "{name.decode()}" does not exist')

    def _error(self, sqlstate: str, message: str) -> bytes:
        self.skipping = True
        if self.status == c.TX_IN_TRANSACTION:
            self.status = c.TX_FAILED
        return errors.build_error_response("ERROR", sqlstate, message)


def _cstring(body: bytes, pos: int) -> tuple[bytes, int]:
    end = body.index(b"\0", pos)
    return body[pos:end], end + 1
