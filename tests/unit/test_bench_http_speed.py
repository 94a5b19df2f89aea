"""bench.http_speed's reading of wrk's report and of py-spy's collapsed stacks: the speed
figure and the profile summary come from these."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.http_speed import HTTP, Measurement, parse_frame, parse_wrk, profile_summary

WRK_REPORT = """\
Running 8s test @ http://127.0.0.1:25323/sql
  2 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.05ms    0.61ms  14.99ms   86.19%
    Req/Sec     2.48k   154.36     2.80k    70.00%
  Latency Distribution
     50%  910.00us
     75%    2.20ms
     90%    2.61ms
     99%    1.17s
  39544 requests in 8.01s, 9.69MB read
Requests/sec:   4936.93
Transfer/sec:      1.21MB
"""


def measurement() -> Measurement:
    return Measurement(round_no=1, clients=10, auth="trust", target=HTTP)


def test_parse_wrk_reads_count_rate_and_percentiles_in_any_unit() -> None:
    result = measurement()
    parse_wrk(WRK_REPORT, result)

    assert (result.count, result.rate) == (39544, 4936.93)
    assert result.p50_ms == pytest.approx(0.91)
    assert result.p99_ms == pytest.approx(1170.0)
    assert result.error is None


def test_parse_wrk_reports_failed_requests_as_the_error() -> None:
    failures = "  Non-2xx or 3xx responses: 3\n  Socket errors: connect 0, read 2, write 0, timeout 0\n"
    failing = WRK_REPORT.replace("Requests/sec:", failures + "Requests/sec:")
    result = measurement()
    parse_wrk(failing, result)

    assert result.count == 39544
    assert result.error == (
        "Non-2xx or 3xx responses: 3; Socket errors: connect 0, read 2, write 0, timeout 0"
    )


def test_parse_wrk_without_a_result_is_an_error() -> None:
    result = measurement()
    parse_wrk("unable to connect to 127.0.0.1:9 Connection refused\n", result)

    assert result.rate is None and result.error is not None


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("Connection.send (h11/_connection.py:512)", ("Connection.send", "h11/_connection.py")),
        ("handle_sql (/work/x/pypooler/sql_over_http.py:88)", ("handle_sql", "pypooler/sql_over_http.py")),
        (
            "CPyDef_client___ClientConnection___data_received (build/__native.c:1234)",
            ("CPyDef_client___ClientConnection___data_received", "client.py (compiled)"),
        ),
        ("write (libc.so.6)", ("write", "libc.so.6")),
    ],
)
def test_parse_frame(frame: str, expected: tuple[str, str]) -> None:
    assert parse_frame(frame) == expected


def test_profile_summary_leaves_idle_out_and_charges_a_write_to_its_caller(tmp_path: Path) -> None:
    loop = "run (uvloop/__init__.py:92);uv_run (core.c:452)"
    stacks = tmp_path / "stacks.txt"
    stacks.write_text(
        f"{loop};epoll_pwait (libc.so.6) 50\n"  # idle: left out
        f"{loop};_send (pypooler/http_listener.py:200);write (libc.so.6) 30\n"
        f"{loop};_read_events (pypooler/http_listener.py:120);next_event (h11/_connection.py:400) 10\n"
    )
    result = measurement()
    result.cpu_s, result.count = 0.4, 1000  # 400 µs per request

    summary = profile_summary(stacks, result)

    assert "40 busy samples (50 idle left out)" in summary
    assert "75.0%   300.0  write (libc.so.6)" in summary  # by function
    assert "75.0%   300.0  pypooler/http_listener.py" in summary  # the write, by its caller
    assert "25.0%   100.0  h11/_connection.py" in summary
