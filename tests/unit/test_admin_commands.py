"""Admin console command parsing and reply encoding (no sockets)."""

from __future__ import annotations

import pytest

from pypooler.admin import Command, ResultSet, parse_command, parse_commands
from pypooler.protocol import codec
from pypooler.protocol import constants as c
from pypooler.protocol.errors import AdminCommandError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SHOW POOLS", Command("SHOW", "POOLS")),
        ("show pools", Command("SHOW", "POOLS")),
        ("  Show\tStats_Totals  ", Command("SHOW", "STATS_TOTALS")),
        ("pause", Command("PAUSE")),
        ("PAUSE app", Command("PAUSE", "app")),
        ('kill "My""Db"', Command("KILL", 'My"Db')),  # a quoted identifier
        ("Kill MyDb", Command("KILL", "MyDb")),  # names keep their case
        ("reload", Command("RELOAD")),
        ("wait_close", Command("WAIT_CLOSE")),
    ],
)
def test_commands_parse_case_insensitively(text: str, expected: Command) -> None:
    assert parse_command(text) == expected


def test_semicolons_separate_commands_and_may_trail() -> None:
    assert parse_commands("SHOW POOLS;") == [Command("SHOW", "POOLS")]
    assert parse_commands("pause app; resume app ;") == [Command("PAUSE", "app"), Command("RESUME", "app")]
    assert parse_commands(" ; ") == []


@pytest.mark.parametrize(
    "text",
    ["SHOW", "SHOW NOSUCH", "SHOW POOLS now", "KILL", "DISABLE", "RELOAD app", "PAUSE a b",
     "SELECT 1", "SET x = 1"],
)  # fmt: skip
def test_anything_else_is_an_error_naming_the_valid_commands(text: str) -> None:
    with pytest.raises(AdminCommandError) as raised:
        parse_command(text)
    error = raised.value
    assert (error.severity, error.sqlstate) == ("ERROR", "42601")
    assert "SHOW {POOLS|" in error.message and "WAIT_CLOSE [db]" in error.message


def test_result_set_encodes_row_description_rows_and_tag() -> None:
    reply = ResultSet([("name", c.OID_TEXT), ("items", c.OID_INT4)], [["pools", "1"], ["x", None]])
    messages = codec.MessageReader().feed(reply.encode())
    assert [t for t, _ in messages] == [
        c.B_ROW_DESCRIPTION, c.B_DATA_ROW, c.B_DATA_ROW, c.B_COMMAND_COMPLETE,
    ]  # fmt: skip
    assert messages[-1][1] == b"SHOW\0"
