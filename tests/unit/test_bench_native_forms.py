"""bench/native_forms: each pair of kernels gives the same answers, and the byte loop it times is
session_state.suspect_text's (it keeps a copy, so that its compiled build calls it natively)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bench import native_forms
from bench.native_paths import HEADER_INPUTS, SUSPECT_INPUTS
from pypooler.protocol import codec
from pypooler.session_state import suspect_text

PIECES = [b"_", b"lock", b"LoCk", b"config", b"conf", b";", b" ", b"\n", b"x", b"SELECT 1", b"_l", b"_c"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_the_byte_loop_is_suspect_text(pieces: list[bytes]) -> None:
    message = codec.build_query(b"".join(pieces).decode())
    end = len(message) - 1
    expected = suspect_text(message, 5, end)
    assert native_forms._suspect_loop(message, 5, end) is expected
    by_regex = native_forms.suspect_by_regex(message, 2)
    assert native_forms.suspect_by_loop(message, 2) == by_regex == 2 * expected


def test_the_forms_agree_on_the_benchmark_inputs() -> None:
    for data in HEADER_INPUTS.values():
        assert native_forms.walk_indexing(data, 3) == native_forms.walk_unpacking(data, 3)
    for data in SUSPECT_INPUTS.values():
        assert native_forms.suspect_by_loop(data, 3) == native_forms.suspect_by_regex(data, 3)
