"""Command line: `pypooler run`, `pypooler demo`, `pypooler check-config`.

`run` with no database configured starts an embedded throwaway PostgreSQL (the same as `demo`), so
a newcomer gets a working pooler from one command. Configuration problems print one line each and
exit with status 2. SIGHUP re-reads the configuration (RELOAD on the admin console does the same);
SIGINT and SIGTERM, or SHUTDOWN on the console, stop the pooler.
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
from pypooler.app import Pooler
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"pypooler: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.command == "check-config":
        print(f"config ok: {len(settings.databases)} database entries")
        return 0
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    embedded = args.command == "demo" or not settings.databases
    return uvloop.run(_serve(settings, args.config, embedded=embedded))


async def _serve(settings: Settings, config: str | None, *, embedded: bool) -> int:
    postgres = None
    embedded_databases: dict[str, DatabaseConfig] = {}
    if embedded:
        from pypooler.embedded import EmbeddedPostgres

        postgres = EmbeddedPostgres(max_connections=100)
        await asyncio.to_thread(postgres.start)
        embedded_databases = {"*": DatabaseConfig(host=postgres.host, port=postgres.port)}
        settings = settings.model_copy(update={"databases": embedded_databases})

    def reload_settings() -> Settings:
        # The same sources as at start (file, environment); the embedded server stays in place.
        fresh = load_settings(config)
        if embedded:
            fresh = fresh.model_copy(update={"databases": embedded_databases})
        return fresh

    stop = asyncio.Event()
    pooler = Pooler(settings, reload_settings=reload_settings, on_shutdown=stop.set)
    try:
        await pooler.start()
        if postgres is not None:
            print(
                "pypooler demo: throwaway PostgreSQL on port "
                f"{postgres.port}; connect through the pooler with:\n"
                f"  psql 'postgresql://postgres@{settings.listen_addr}:{pooler.port}/pypooler_test'",
                flush=True,
            )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, pooler)
        await stop.wait()
        log.info("shutting down")
    finally:
        await pooler.stop()
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
    return 0


def _reload_on_signal(pooler: Pooler) -> None:
    """SIGHUP: RELOAD, as PgBouncer does; a bad file is logged and the running config kept."""
    try:
        pooler.reload()
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload failed, configuration unchanged: %s", problem)


if __name__ == "__main__":
    sys.exit(main())
