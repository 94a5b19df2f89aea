"""The pure parts of sql_over_http: request parsing, the connection string, and the collector
that turns a pipeline's replies into JSON (fed messages built with the codec, no sockets)."""

from __future__ import annotations

import json

import pytest

from pypooler.http_types import HttpRequest
from pypooler.protocol import codec
from pypooler.protocol.errors import HttpLimitExceeded, HttpRequestInvalid, build_error_response
from pypooler.sql_over_http import ResultCollector, parse_connection_string, parse_sql_request


def request(body: bytes, **headers: str) -> HttpRequest:
    return HttpRequest(
        "POST", "/sql", "", {k.replace("_", "-"): v for k, v in headers.items()}, body, "127.0.0.1:1"
    )


def test_a_single_query_and_its_parameters() -> None:
    parsed = parse_sql_request(
        request(b'{"query": "SELECT $1, $2, $3, $4", "params": ["a", null, 5, true]}'), 10
    )
    assert not parsed.batch and parsed.begin == ""
    assert parsed.statements[0].sql == "SELECT $1, $2, $3, $4"
    assert parsed.statements[0].parameters == ["a", None, "5", "true"]


def test_a_batch_and_its_begin() -> None:
    body = b'{"queries": [{"query": "SELECT 1", "params": []}, {"query": "SELECT 2"}]}'
    headers = {"neon_batch_isolation_level": "RepeatableRead", "neon_batch_read_only": "true"}
    parsed = parse_sql_request(request(body, **headers), 10)
    assert parsed.batch and len(parsed.statements) == 2
    assert parsed.begin == "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
    deferrable = {**headers, "neon_batch_isolation_level": "Serializable", "neon_batch_deferrable": "true"}
    assert parse_sql_request(request(body, **deferrable), 10).begin.endswith(
        "SERIALIZABLE READ ONLY DEFERRABLE"
    )
    assert parse_sql_request(request(body), 10).begin == "BEGIN"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{", {}),
        (b"\xff", {}),
        (b"[]", {}),
        (b'{"query": "x", "params": 3}', {}),
        (b'{"queries": {}}', {}),
        (b'{"queries": []}', {"neon_batch_isolation_level": "Whatever"}),
        (b'{"query": "x"}', {"neon_array_mode": "yes"}),
    ],
)
def test_malformed_requests(body: bytes, headers: dict[str, str]) -> None:
    with pytest.raises(HttpRequestInvalid):
        parse_sql_request(request(body, **headers), 10)


def test_batches_over_the_limit() -> None:
    body = json.dumps({"queries": [{"query": "SELECT 1"}] * 3}).encode()
    with pytest.raises(HttpLimitExceeded, match="http_max_batch_queries"):
        parse_sql_request(request(body), 2)


def test_connection_strings() -> None:
    credentials = parse_connection_string(
        "postgresql://al%40ice:p%3Ass@ep-x.example:5432/my%20db?application_name=a+b&x=1"
    )
    assert (credentials.user, credentials.password, credentials.database) == ("al@ice", "p:ss", "my db")
    assert credentials.application_name == "a b"
    assert parse_connection_string("postgres://bob@h/db").password is None
    for bad in ("", "mysql://u:p@h/db", "postgresql://h/db", "postgresql://u@h/"):
        with pytest.raises(HttpRequestInvalid):
            parse_connection_string(bad)


def feed_all(collector: ResultCollector, messages: bytes) -> bool:
    finished = False
    for msg_type, body in codec.MessageReader().feed(messages):
        finished = collector.feed(msg_type, body)
        if finished:
            break
    return finished


PIPELINE_REPLY = (
    codec.PARSE_COMPLETE
    + codec.build_message(ord("2"))
    + codec.build_row_description([("n", 23), ("t", 25)])
    + codec.build_data_row(["1", "é"])
    + codec.build_data_row([None, "x"])
    + codec.build_command_complete("SELECT 2")
    + codec.build_ready_for_query()
)


def test_rows_as_arrays_of_text() -> None:
    collector = ResultCollector(array_mode=True, raw_text=True, limit=10_000)
    assert feed_all(collector, PIPELINE_REPLY)
    (result,) = (json.loads(r) for r in collector.results)
    assert result["command"] == "SELECT" and result["rowCount"] == 2 and result["rowAsArray"] is True
    assert [f["dataTypeID"] for f in result["fields"]] == [23, 25]
    assert result["rows"] == [["1", "é"], [None, "x"]]
    assert collector.ready_status == b"I" and collector.error is None


def test_rows_as_objects_of_typed_values() -> None:
    collector = ResultCollector(array_mode=False, raw_text=False, limit=10_000)
    feed_all(collector, PIPELINE_REPLY)
    assert json.loads(collector.results[0])["rows"] == [{"n": 1, "t": "é"}, {"n": None, "t": "x"}]


def test_an_error_is_kept_for_the_response() -> None:
    collector = ResultCollector(array_mode=True, raw_text=True, limit=10_000)
    error = build_error_response("ERROR", "22012", "division by zero")
    assert feed_all(collector, codec.PARSE_COMPLETE + error + codec.build_ready_for_query())
    assert collector.error is not None and collector.error["C"] == "22012"


def test_the_response_limit_stops_reading() -> None:
    collector = ResultCollector(array_mode=True, raw_text=True, limit=100)
    rows = b"".join(codec.build_data_row(["x" * 40]) for _ in range(10))
    described = codec.build_row_description([("x", 25)])
    assert feed_all(collector, described + rows + codec.build_command_complete("SELECT 10"))
    assert collector.over_limit and collector.failed and collector.results == []


def test_copy_is_refused() -> None:
    collector = ResultCollector(array_mode=True, raw_text=True, limit=100)
    assert feed_all(collector, codec.build_message(ord("H"), b"\0\0\0"))
    assert collector.unsupported == "COPY"
