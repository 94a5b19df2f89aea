"""The two forms of each `codec.NATIVE` branch on the hot path, as loops to time (bench/native_paths).

`python -m bench.native_paths` runs this module as it is from the Python sources, and compiles a
copy with mypyc for the compiled build, so each form is timed the way each build would run it.
Every kernel repeats its form `times` times inside the module, so a compiled kernel is timed
without the interpreter's call per operation.
"""

from __future__ import annotations

from typing import Final

from pypooler.protocol.codec import unpack_header
from pypooler.session_state import MORE_STATEMENTS, SUSPECT_FUNCTION

_Z: Final = 0x5A  # ReadyForQuery
_UNDERSCORE: Final = 0x5F
_SEMICOLON: Final = 0x3B
_LOW_L: Final = 0x6C
_LOW_C: Final = 0x63
_BLANKS_AND_SEMICOLON: Final = b" \t\n\r\f\v;"


# --------------------------------------------------------------------------- message headers
# transaction.FrontendStream/BackendStream.feed, rewriting's three loops and feed_to's fast path.


def walk_indexing(data: bytes, times: int) -> int:
    """Walk `data`'s messages `times` times, reading each header by indexing bytes."""
    found = 0
    end = len(data)
    for _ in range(times):
        pos = 0
        while end - pos >= 5:
            msg_type = data[pos]
            length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
            if msg_type == _Z:
                found += 1
            pos += 1 + length
    return found


def walk_unpacking(data: bytes, times: int) -> int:
    """The same walk, each header read with codec.unpack_header (struct)."""
    found = 0
    end = len(data)
    for _ in range(times):
        pos = 0
        while end - pos >= 5:
            msg_type, length = unpack_header(data, pos)
            if msg_type == _Z:
                found += 1
            pos += 1 + length
    return found


# --------------------------------------------------------------------------- suspect statement text
# rewriting.RewritingFrontend.feed_to's fast path for one simple Query: "_lock"/"_config" in the
# text, or a second statement after a semicolon.


def _suspect_loop(data: bytes, start: int, end: int) -> bool:
    # The form of session_state.suspect_text (one pass of byte compares), here so that the
    # compiled kernel calls it natively, as rewriting.py does in the compiled build.
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


def suspect_by_loop(data: bytes, times: int) -> int:
    """Test a whole Query message's text `times` times with the byte loop."""
    found = 0
    end = len(data) - 1  # the text, without its NUL
    for _ in range(times):
        if _suspect_loop(data, 5, end):
            found += 1
    return found


def suspect_by_regex(data: bytes, times: int) -> int:
    """The same test as two regular-expression searches."""
    found = 0
    end = len(data) - 1
    for _ in range(times):
        if (
            SUSPECT_FUNCTION.search(data, 5, end) is not None
            or MORE_STATEMENTS.search(data, 5, end) is not None
        ):
            found += 1
    return found
