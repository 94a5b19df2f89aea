"""Command line: `pypooler run`, `pypooler demo`, `pypooler check-config`.

`run` with no database configured starts an embedded throwaway PostgreSQL (the same as `demo`), so
a newcomer gets a working pooler from one command. Configuration problems print one line each and
exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop

from pypooler import __version__
from pypooler.app import Pooler, check_files
from pypooler.config import ConfigError, DatabaseConfig, Settings, load_settings

log = logging.getLogger("pypooler")

EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pypooler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pypooler {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pooler (embedded PostgreSQL if none configured)")
    run.add_argument("--config", "-c", help="TOML config file (default: $PYPOOLER_CONFIG)")
    demo = commands.add_parser("demo", help="run the pooler in front of a throwaway PostgreSQL")
    demo.add_argument("--config", "-c", help="TOML config file for pooler settings")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", "-c", help="TOML config file (default: $PYPOOLER_CONFIG)")
    advise = commands.add_parser("advise", help="ask a running pypooler why its pools wait")
    advise.add_argument("--config", "-c", help="its config file (for listen address and port)")
    advise.add_argument("--host", help="pypooler host (default: listen_addr from the config)")
    advise.add_argument("--port", type=int, help="pypooler port (default: listen_port)")
    advise.add_argument("--user", default="postgres", help="an admin_users/stats_users name")
    advise.add_argument("--password", help="that user's password, if the console asks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        check_files(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"pypooler: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check-config":
        print(f"config ok: {len(settings.databases)} database entries")
        return 0
    if args.command == "advise":
        return _advise(args, settings)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    embedded = args.command == "demo" or not settings.databases
    return uvloop.run(_serve(settings, embedded=embedded))


def _advise(args: argparse.Namespace, settings: Settings) -> int:
    """Print SHOW ADVICE from a running pypooler as a report a person reads top to bottom."""
    from pypooler.console_client import ConsoleError, simple_query

    host = args.host or settings.listen_addr
    port = args.port or settings.listen_port
    try:
        columns, rows = uvloop.run(
            simple_query(host, port, "SHOW ADVICE", user=args.user, password=args.password)
        )
    except (OSError, TimeoutError, ConsoleError) as exc:
        print(f"pypooler advise: cannot read the console at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    if not rows:
        print("no pools yet: no client has connected through this pypooler")
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        print(f"pool {record['database']}/{record['user']} (last {record['window_s']} s)")
        for name in columns[2:-1]:
            print(f"  {name:30} {record[name] if record[name] is not None else '-'}")
        for verdict in (record["verdict"] or "").split(" | "):
            print(f"  => {verdict}")
        print()
    return 0


async def _serve(settings: Settings, *, embedded: bool) -> int:
    postgres = None
    if embedded:
        from pypooler.embedded import EmbeddedPostgres

        postgres = EmbeddedPostgres(max_connections=100)
        await asyncio.to_thread(postgres.start)
        settings = settings.model_copy(
            update={"databases": {"*": DatabaseConfig(host=postgres.host, port=postgres.port)}}
        )
    pooler = Pooler(settings)
    try:
        await pooler.start()
        if postgres is not None:
            print(
                "pypooler demo: throwaway PostgreSQL on port "
                f"{postgres.port}; connect through the pooler with:\n"
                f"  psql 'postgresql://postgres@{settings.listen_addr}:{pooler.port}/pypooler_test'",
                flush=True,
            )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await pooler.stop()
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
