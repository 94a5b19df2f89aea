"""Client-side load for `bench.run`, in a process of its own: `python -m bench.loadgen KIND JSON`.

The clients run apart from the proxies they measure, so a proxy's CPU is its own and a busy
client loop cannot pass for a slow proxy (on a 2-core machine they still share the cores; the
report says so). Three kinds of load, each given its parameters as one JSON object and answering
with one JSON object on stdout (progress, if any, goes to stderr):

- `fanout`: serverless invocations. `n` coroutines start together at the wall-clock time
  `start_at` (so several processes burst at once); each opens its own asyncpg connection, runs
  one short query and closes it. Answers each invocation's latency and errors by message.
- `pools`: application instances, each with its own asyncpg pool (min_size 0, max_size
  `pool_max`, like SQLAlchemy's QueuePool growing on demand; asyncpg's reset on release unless
  `reset_on_release` is false), fed by open-loop Poisson arrivals
  for `duration_s`. A request checks a connection out, runs `queries` statements (each in a
  transaction that also holds the connection for `xact_hold_s` when that is > 0), spends
  `think_s` of non-database work between statements, and gives the connection back. Samples
  pg_stat_activity (over a connection opened before the load) and, when given, pypooler's
  /metrics while it runs.
- `idle`: `n` raw protocol clients from several source addresses on 127.0.0.0/8 log in, report,
  and stay idle until a line arrives on stdin; what a proxy's memory per idle client is measured
  against.

Rules: every loop is bounded in count (arrivals stop at `duration_s`, in-flight requests are
capped, idle clients are `n`) and in time (every wait has a timeout); only loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from pypooler.protocol import codec
from pypooler.protocol import constants as c

ERROR_TEXT_LIMIT = 120
# Latencies beyond this many are thinned evenly before they are sent back (JSON size).
MAX_LATENCIES = 50_000
CLOSE_TIMEOUT_S = 5.0
PG_SAMPLE_INTERVAL_S = 0.1
METRICS_SAMPLE_INTERVAL_S = 0.25
HTTP_TIMEOUT_S = 2.0
READ_CHUNK = 65536


def describe_error(exc: BaseException) -> str:
    """The words a user would see: the server's message when there is one."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    message = f"{name}: {text}" if text else name
    return message[:ERROR_TEXT_LIMIT]


def thin(values: list[float], limit: int = MAX_LATENCIES) -> list[float]:
    if len(values) <= limit:
        return values
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


# -- fanout ----------------------------------------------------------------------------------


async def fanout(params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["n"]
    timeout_s: float = params["timeout_s"]
    connect_args = {
        "host": params["host"], "port": params["port"], "user": params["user"],
        "database": params["database"], "ssl": False,
        # Transaction pooling cannot keep named prepared statements (another issue's work).
        "statement_cache_size": 0,
        "server_settings": {"application_name": params["application_name"]},
    }  # fmt: skip
    delay = params["start_at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def invocation() -> tuple[float, str | None]:
        try:
            async with asyncio.timeout(timeout_s):
                conn = await asyncpg.connect(**connect_args, timeout=timeout_s)
                try:
                    await conn.fetchval("SELECT 1")
                finally:
                    await conn.close(timeout=CLOSE_TIMEOUT_S)
        except Exception as exc:
            return loop.time() - started, describe_error(exc)
        return loop.time() - started, None

    outcomes = await asyncio.gather(*(invocation() for _ in range(n)))
    latencies = sorted(latency for latency, error in outcomes if error is None)
    errors = Counter(error for _, error in outcomes if error is not None)
    return {
        "n": n,
        "ok": len(latencies),
        "errors": dict(errors),
        "latencies": thin(latencies),
        "wall_s": max((latency for latency, _ in outcomes), default=0.0),
        "start_lag_s": max(0.0, -delay),
    }


# -- pools -----------------------------------------------------------------------------------


async def http_get(url: str) -> str:
    """A plain HTTP/1.1 GET of a loopback URL (no client library needed for /metrics)."""
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    async with asyncio.timeout(HTTP_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode())
            raw = await reader.read()
        finally:
            writer.close()
    return raw.partition(b"\r\n\r\n")[2].decode()


def metric_sums(text: str, wanted: dict[str, tuple[str, dict[str, str]]]) -> dict[str, float]:
    """For each key: the sum of the samples named like it whose labels include the given ones."""
    sums = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, (name, labels) in wanted.items():
                if sample.name == name and labels.items() <= sample.labels.items():
                    sums[key] += sample.value
    return sums


async def sample_until(
    stop: asyncio.Event, interval: float, sample: Callable[[], Awaitable[list[float]]]
) -> list[list[float]]:
    """[elapsed seconds, *values] every `interval` until `stop`; a failed sample is skipped."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    samples: list[list[float]] = []
    while not stop.is_set():
        try:
            values = await sample()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            values = []
        if values:
            samples.append([round(loop.time() - started, 3), *values])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return samples


async def _no_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Replaces asyncpg's reset on release (RESET ALL, UNLISTEN *, ...): through a
    transaction pooler that reset is a transaction of its own, and the hold scenario counts
    one transaction per request."""


async def pools(params: dict[str, Any]) -> dict[str, Any]:
    instances: int = params["instances"]
    duration_s: float = params["duration_s"]
    rate_per_instance = params["rate"] / instances
    queries: int = params["queries"]
    think_s: float = params["think_s"]
    xact_hold_s: float = params["xact_hold_s"]
    acquire_timeout_s: float = params["acquire_timeout_s"]
    request_timeout_s: float = params["request_timeout_s"]
    max_in_flight: int = params["max_in_flight"]
    rng = random.Random(params.get("seed", 1))
    loop = asyncio.get_running_loop()

    # The monitor connects straight to PostgreSQL before any load, so it has a slot even when
    # the instances fill max_connections.
    monitor = await asyncpg.connect(
        host=params["pg_host"], port=params["pg_port"], user=params["user"],
        database=params["database"], ssl=False, statement_cache_size=0,
    )  # fmt: skip
    stop_sampling = asyncio.Event()

    async def pg_sample() -> list[float]:
        count = await monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return [float(count)]

    wanted = {
        "waiting": ("pypooler_clients", {"state": "waiting"}),
        "active": ("pypooler_servers", {"state": "active"}),
    }

    async def metrics_sample() -> list[float]:
        sums = metric_sums(await http_get(params["metrics_url"] + "/metrics"), wanted)
        return [sums["waiting"], sums["active"]]

    samplers = [asyncio.create_task(sample_until(stop_sampling, PG_SAMPLE_INTERVAL_S, pg_sample))]
    if params.get("metrics_url"):
        samplers.append(
            asyncio.create_task(sample_until(stop_sampling, METRICS_SAMPLE_INTERVAL_S, metrics_sample))
        )

    app_pools = [
        await asyncpg.create_pool(
            host=params["host"],
            port=params["port"],
            user=params["user"],
            database=params["database"],
            ssl=False,
            statement_cache_size=0,
            min_size=0,
            max_size=params["pool_max"],
            server_settings={"application_name": params["application_name"]},
            reset=None if params.get("reset_on_release", True) else _no_reset,
        )
        for _ in range(instances)
    ]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    shed = 0
    arrived = 0
    in_flight: set[asyncio.Task[None]] = set()

    async def request(pool: asyncpg.Pool, arrival: float) -> None:
        try:
            async with asyncio.timeout(request_timeout_s):
                async with pool.acquire(timeout=acquire_timeout_s) as conn:
                    for index in range(queries):
                        if index:
                            await asyncio.sleep(think_s)  # work that is not the database's
                        if xact_hold_s > 0:
                            async with conn.transaction():
                                await conn.fetchval("SELECT 1")
                                await asyncio.sleep(xact_hold_s)  # held inside the transaction
                        else:
                            await conn.fetchval("SELECT 1")
        except Exception as exc:
            errors[describe_error(exc)] += 1
            return
        latencies.append(loop.time() - arrival)

    started = loop.time()
    end = started + duration_s

    async def arrivals(pool: asyncpg.Pool) -> None:
        nonlocal shed, arrived
        next_at = started
        while True:
            next_at += rng.expovariate(rate_per_instance)
            if next_at >= end:
                return
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            arrived += 1
            if len(in_flight) >= max_in_flight:
                shed += 1
                continue
            task = asyncio.create_task(request(pool, next_at))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    await asyncio.gather(*(arrivals(pool) for pool in app_pools))
    if in_flight:
        await asyncio.wait(set(in_flight), timeout=request_timeout_s + CLOSE_TIMEOUT_S)
    finished = loop.time()
    stop_sampling.set()
    samples = [await sampler for sampler in samplers]
    for pool in app_pools:
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()
    await monitor.close(timeout=CLOSE_TIMEOUT_S)
    latencies.sort()
    return {
        "arrived": arrived,
        "ok": len(latencies),
        "errors": dict(errors),
        "shed": shed,
        "latencies": thin(latencies),
        "wall_s": finished - started,
        "pg_samples": samples[0],
        "metrics_samples": samples[1] if len(samples) > 1 else [],
    }


# -- idle ------------------------------------------------------------------------------------


async def login(host: str, port: int, source: str, startup: bytes) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    writer.write(startup)
    messages = codec.MessageReader()
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            writer.close()
            raise ConnectionError("closed during login")
        for msg_type, body in messages.feed(data):
            if msg_type == c.B_ERROR_RESPONSE:
                writer.close()
                raise ConnectionError(codec.parse_error_fields(body).get("M", "error"))
            if msg_type == c.B_READY_FOR_QUERY:
                return writer


async def idle(params: dict[str, Any]) -> dict[str, Any]:
    n: int = params["n"]
    sources: list[str] = params["sources"]
    startup = codec.build_startup_message(
        {"user": params["user"], "database": params["database"], "application_name": "bench-idle"}
    )
    gate = asyncio.Semaphore(params["concurrency"])
    writers: list[asyncio.StreamWriter] = []
    errors: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(index: int) -> None:
        async with gate:
            try:
                async with asyncio.timeout(params["timeout_s"]):
                    writers.append(
                        await login(params["host"], params["port"], sources[index % len(sources)], startup)
                    )
            except Exception as exc:
                errors[describe_error(exc)] += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    report = {"n": n, "ok": len(writers), "errors": dict(errors), "login_s": loop.time() - started}
    print(json.dumps(report), flush=True)
    # Stay idle until the orchestrator has measured; EOF (it died) ends us too.
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), params["hold_s"])
    for writer in writers:
        writer.write(codec.TERMINATE)
        writer.close()
    await asyncio.sleep(0.1)
    return report


KINDS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "fanout": fanout,
    "pools": pools,
    "idle": idle,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in KINDS:
        print(f"usage: python -m bench.loadgen {{{','.join(KINDS)}}} JSON", file=sys.stderr)
        return 2
    params = json.loads(argv[1])
    result = uvloop.run(KINDS[argv[0]](params))
    if argv[0] != "idle":  # idle printed its report before it went idle
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
