"""POST /sql handled by sql_over_http.handle_sql, called directly with HttpRequest objects, against
a real pypooler and the session PostgreSQL (the listener that parses HTTP is tested on its own).

Requests are built as @neondatabase/serverless 1.2's neon() sends them: JSON text body, the
Neon-Connection-String, Neon-Raw-Text-Output and Neon-Array-Mode headers, and the batch headers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pypooler.http_types import HttpRequest, HttpResponse
from pypooler.sql_over_http import handle_sql
from tests.support.poolers import RunningPooler

DRIVER_HEADERS = {"neon-raw-text-output": "true", "neon-array-mode": "true"}


def sql_request(
    running: RunningPooler,
    document: Any,
    *,
    user: str = "postgres",
    password: str = "",
    database: str = "pypooler_test",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> HttpRequest:
    credentials = f"{user}:{password}" if password else user
    all_headers = {
        "content-type": "text/plain;charset=UTF-8",
        "neon-connection-string": f"postgresql://{credentials}@localhost/{database}?application_name=test",
        **DRIVER_HEADERS,
        **(headers or {}),
    }
    return HttpRequest(
        method="POST",
        path="/sql",
        query="",
        headers=all_headers,
        body=json.dumps(document).encode() if body is None else body,
        peer="127.0.0.1:50000",
    )


def call(running: RunningPooler, request: HttpRequest) -> tuple[int, Any]:
    response: HttpResponse = running.call_async(handle_sql(running.pooler, request))
    return response.status, json.loads(response.body)


def post(running: RunningPooler, document: Any, **kwargs: Any) -> tuple[int, Any]:
    return call(running, sql_request(running, document, **kwargs))


def test_a_query_with_parameters_answers_fields_and_text_rows(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    running = start_pooler(pool_size=2)
    status, result = post(
        running,
        {
            "query": "SELECT $1::int AS n, $2::text AS t, $3::bool AS b, $4::jsonb AS j",
            "params": ["7", "hé", "t", None],
        },
    )
    assert status == 200, result
    assert result["command"] == "SELECT" and result["rowCount"] == 1 and result["rowAsArray"] is True
    assert [(f["name"], f["dataTypeID"]) for f in result["fields"]] == [
        ("n", 23),
        ("t", 25),
        ("b", 16),
        ("j", 3802),
    ]
    assert result["fields"][0]["format"] == "text"
    assert result["rows"] == [["7", "hé", "t", None]]
    assert running.server_count() == 1  # the one server went back to the pool


def test_object_rows_and_typed_values_when_the_driver_asks(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    running = start_pooler(pool_size=2)
    typed = {"neon-raw-text-output": "false", "neon-array-mode": "false"}
    status, result = post(
        running,
        {
            "query": "SELECT 1::int2 AS a, 2.5::float8 AS b, true AS c,"
            " '{\"k\": [1]}'::json AS d, 9::int8 AS e"
        },
        headers=typed,
    )
    assert status == 200
    assert result["rowAsArray"] is False
    assert result["rows"] == [{"a": 1, "b": 2.5, "c": True, "d": {"k": [1]}, "e": "9"}]


def test_commands_without_rows_report_their_tag_and_count(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=2)
    assert post(running, {"query": "CREATE TEMP TABLE IF NOT EXISTS http_tmp (x int)"})[0] == 200
    status, result = post(
        running, {"query": "SELECT * FROM generate_series(1, 3) WHERE $1", "params": ["false"]}
    )
    assert (status, result["rowCount"], result["rows"]) == (200, 0, [])
    status, result = post(running, {"query": ""})
    assert status == 200 and result["rows"] == []


def test_a_batch_runs_as_one_transaction_with_its_isolation_level(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    running = start_pooler(pool_size=2)
    headers = {
        "neon-batch-isolation-level": "Serializable",
        "neon-batch-read-only": "true",
        "neon-batch-deferrable": "true",
    }
    status, result = post(
        running,
        {
            "queries": [
                {"query": "SELECT current_setting('transaction_isolation') AS i", "params": []},
                {
                    "query": "SELECT current_setting('transaction_read_only') AS r,"
                    " txid_current_if_assigned() AS x",
                    "params": [],
                },
                {"query": "SELECT $1::int + 1 AS n", "params": ["41"]},
            ]
        },
        headers=headers,
    )
    assert status == 200
    rows = [r["rows"] for r in result["results"]]
    assert rows == [[["serializable"]], [["on", None]], [["42"]]]


def test_a_failed_batch_rolls_back_and_reports_the_error(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=2)
    table = "http_batch_rollback"
    assert post(running, {"query": f"CREATE TABLE IF NOT EXISTS {table} (x int primary key)"})[0] == 200
    post(running, {"query": f"TRUNCATE {table}"})
    status, error = post(
        running,
        {
            "queries": [
                {"query": f"INSERT INTO {table} VALUES (1)", "params": []},
                {"query": "SELECT 1/0", "params": []},
            ]
        },
    )
    assert status == 400
    assert (
        error["code"] == "22012" and error["message"] == "division by zero" and error["severity"] == "ERROR"
    )
    status, result = post(running, {"query": f"SELECT count(*) FROM {table}"})
    assert result["rows"] == [["0"]]
    status, result = post(running, {"queries": [{"query": f"INSERT INTO {table} VALUES (2)", "params": []}]})
    assert (
        status == 200
        and result["results"][0]["command"] == "INSERT"
        and result["results"][0]["rowCount"] == 1
    )
    assert post(running, {"query": f"SELECT x FROM {table}"})[1]["rows"] == [["2"]]
    post(running, {"query": f"DROP TABLE {table}"})


def test_postgresql_errors_carry_their_fields(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=2)
    status, error = post(running, {"query": "SELECT nosuchcolumn FROM pg_class"})
    assert status == 400
    assert error["code"] == "42703" and error["position"] == "8" and "nosuchcolumn" in error["message"]
    assert "routine" in error and "file" in error
    status, error = post(running, {"query": "SELECT 1; SELECT 2"})  # one statement per query
    assert (status, error["code"]) == (400, "42601")
    # The server survived both and is still the pool's only one.
    assert post(running, {"query": "SELECT 1"})[0] == 200
    assert running.server_count() == 1


def test_session_state_never_reaches_the_next_request(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=1)
    assert post(running, {"query": "SET search_path TO nowhere"})[0] == 200
    assert post(running, {"query": "SHOW search_path"})[1]["rows"] == [['"$user", public']]
    before = post(running, {"query": "SELECT pg_backend_pid()"})[1]["rows"]
    assert post(running, {"query": "BEGIN"})[0] == 200  # left open: its server is closed, not reused
    result = post(running, {"query": "SELECT pg_backend_pid(), pg_current_xact_id_if_assigned()"})[1]
    assert result["rows"][0][0] != before[0][0] and result["rows"][0][1] is None


def test_pooler_errors_carry_their_sqlstate(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=1)
    status, error = post(running, {"query": "SELECT 1"}, database="nosuchdb")
    assert (status, error["code"]) == (400, "3D000")
    status, error = post(running, {"query": "SELECT 1"}, database="pgbouncer")
    assert (status, error["code"]) == (400, "3D000")
    request = sql_request(running, {"query": "SELECT 1"}, headers={"neon-connection-string": ""})
    assert call(running, request)[1]["code"] == "08P01"


def test_passwords_are_checked_as_for_any_login(
    start_pooler: Callable[..., RunningPooler], tmp_path: Path
) -> None:
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text('"pp_md5" "md5pass"\n"postgres" "secret"\n')
    running = start_pooler(pool_size=1, auth_type="scram-sha-256", auth_file=str(auth_file))
    status, error = post(running, {"query": "SELECT 1"}, user="pp_md5", password="wrong")
    assert (status, error["code"]) == (400, "28P01")
    assert error["message"] == 'password authentication failed for user "pp_md5"'
    status, error = post(running, {"query": "SELECT 1"}, user="nobody", password="x")
    assert (status, error["code"]) == (400, "28P01")
    status, result = post(running, {"query": "SELECT current_user AS u"}, user="pp_md5", password="md5pass")
    assert (status, result["rows"]) == (200, [["pp_md5"]])


def test_hba_rules_see_the_request_address(
    start_pooler: Callable[..., RunningPooler], tmp_path: Path
) -> None:
    hba = tmp_path / "hba.conf"
    hba.write_text("host all postgres 10.0.0.0/8 trust\nhost all all 127.0.0.1/32 reject\n")
    running = start_pooler(pool_size=1, auth_type="hba", auth_hba_file=str(hba))
    status, error = post(running, {"query": "SELECT 1"})
    assert (status, error["code"]) == (400, "28000")
    assert "127.0.0.1" in error["message"]


def test_a_wait_for_a_server_is_bounded_by_query_wait_timeout(
    start_pooler: Callable[..., RunningPooler],
) -> None:
    running = start_pooler(pool_size=1, query_wait_timeout=0.5)
    pool = running.pooler.manager.get_pool("pypooler_test", "postgres")
    assert pool is not None
    pool_taken = running.call_async(pool.borrow())
    try:
        status, error = post(running, {"query": "SELECT 1"})
        assert (status, error["code"]) == (400, "08006")
        assert "query_wait_timeout" in error["message"] or "wait" in error["message"]
    finally:
        running.call(lambda: running.pool().release(pool_taken))


def test_limits_are_clear_errors(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=1, http_max_batch_queries=2, http_max_response_bytes=4096)
    status, error = post(running, {"queries": [{"query": "SELECT 1", "params": []}] * 3})
    assert (status, error["code"]) == (400, "54000") and "http_max_batch_queries" in error["message"]
    status, error = post(running, {"query": "SELECT repeat('x', 100) FROM generate_series(1, 100000)"})
    assert (status, error["code"]) == (400, "54000") and "http_max_response_bytes" in error["message"]
    # A batch refused for its size is rolled back, not committed.
    post(running, {"query": "CREATE TABLE IF NOT EXISTS http_big (x int)"})
    post(running, {"query": "TRUNCATE http_big"})
    status, error = post(
        running,
        {
            "queries": [
                {"query": "INSERT INTO http_big VALUES (1)", "params": []},
                {"query": "SELECT repeat('x', 100) FROM generate_series(1, 1000)", "params": []},
            ]
        },
    )
    assert (status, error["code"]) == (400, "54000")
    assert post(running, {"query": "SELECT count(*) FROM http_big"})[1]["rows"] == [["0"]]
    post(running, {"query": "DROP TABLE http_big"})
    status, error = post(running, {"query": "COPY (SELECT 1) TO STDOUT"})
    assert (status, error["code"]) == (400, "0A000")
    assert post(running, {"query": "SELECT 1"})[0] == 200


def test_bad_input_is_refused_alone(start_pooler: Callable[..., RunningPooler]) -> None:
    running = start_pooler(pool_size=1)
    status, error = call(running, sql_request(running, None, body=b"{not json"))
    assert (status, error["code"]) == (400, "08P01") and "JSON" in error["message"]
    status, error = call(running, sql_request(running, None, body=b'{"query": 1}'))
    assert (status, error["code"]) == (400, "08P01")
    status, error = post(running, {"query": "SELECT 1", "params": {"a": 1}})
    assert (status, error["code"]) == (400, "08P01")
    wrong_type = sql_request(
        running, {"query": "SELECT 1"}, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert call(running, wrong_type)[0] == 415
    status, error = post(running, {"queries": [], "x": 1}, headers={"neon-batch-isolation-level": "Chaos"})
    assert (status, error["code"]) == (400, "08P01")
    assert post(running, {"query": "SELECT 1"})[0] == 200
