"""Command line: `pypooler run`, `demo`, `check-config`, `convert`, `advise`.

`run` with no database configured starts an embedded throwaway PostgreSQL (the same as `demo`), so
a newcomer gets a working pooler from one command. Configuration problems print one line each and
exit with status 2. `--config` takes a TOML file or PgBouncer's own pgbouncer.ini (a name ending in
`.ini`); `convert` prints such an ini as the equivalent TOML. `advise` prints a running pooler's
SHOW ADVICE, reaching its console as psql would (console_client.py); when it cannot, one line
says why and the exit status is 2.

Signals while running:
- SIGHUP re-reads the config file and the environment and applies them without dropping a client
  (`Pooler.reload`); a file with errors is logged and the old configuration kept.
- SIGTERM (or SHUTDOWN on the admin console) drains (`Pooler.drain`): stop accepting, close
  clients between transactions, refuse new transactions, let running ones finish within
  `shutdown_drain_timeout`, exit 0.
- SIGINT does the same with at most FAST_DRAIN_S for running transactions (Ctrl-C at a terminal).
- A second SIGTERM or SIGINT during the drain closes everything at once and exits 1.
- Whatever a drain leaves running, and what a second signal cuts, ends as PostgreSQL ends a
  terminated backend: FATAL 57P01 "terminating connection due to administrator command"
  (Pooler.stop), not a bare close.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvloop

from pypooler import __version__, log_output
from pypooler.app import Pooler, check_files
from pypooler.config import ConfigError, DatabaseConfig, Settings, load_settings
from pypooler.pgbouncer_ini import read_ini, to_toml

log = logging.getLogger("pypooler")

EXIT_CONFIG_ERROR = 2
# `advise` could not read the console (unreachable, login refused): psql's status when the
# connection to the server went bad.
EXIT_CONSOLE_ERROR = 2
EXIT_DRAIN_ABANDONED = 1
CONFIG_HELP = "config file: TOML, or PgBouncer's pgbouncer.ini (default: $PYPOOLER_CONFIG)"
FAST_DRAIN_S = 1.0  # SIGINT's cap on the drain: a person pressing Ctrl-C wants it over quickly


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pypooler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pypooler {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pooler (embedded PostgreSQL if none configured)")
    run.add_argument("--config", "-c", help=CONFIG_HELP)
    demo = commands.add_parser("demo", help="run the pooler in front of a throwaway PostgreSQL")
    demo.add_argument("--config", "-c", help="config file for pooler settings (TOML or .ini)")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", "-c", help=CONFIG_HELP)
    convert = commands.add_parser("convert", help="print a pgbouncer.ini as pypooler's TOML")
    convert.add_argument("ini", help="PgBouncer's config file")
    advise = commands.add_parser(
        "advise",
        help="ask a running pypooler why its pools wait",
        description="Connects to the admin console as psql would (libpq: PG* variables, .pgpass, "
        "TLS, unix sockets); what libpq is not told comes from pypooler's settings.",
    )
    advise.add_argument("--config", "-c", help="its config file (socket dir, port, admin user)")
    advise.add_argument("--dsn", help="libpq conninfo or URI for the console (host, sslmode, ...)")
    advise.add_argument("--host", help="host name, address or unix socket directory")
    advise.add_argument("--port", type=int, help="port (also names the unix socket)")
    advise.add_argument("--user", help="an admin_users/stats_users name")
    advise.add_argument("--password", help=argparse.SUPPRESS)  # removed: refused with a reason
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        return _convert(args.ini)
    # advise reads where the console is, never the files the pooler loads (secrets an operator
    # running it may not be allowed to read).
    loads_files = args.command != "advise"
    try:
        settings = load_settings(args.config, read_files=loads_files)
        if loads_files:
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
    log_output.install(settings.log_level, sys.stderr)
    embedded = args.command == "demo" or not settings.databases
    try:
        return uvloop.run(_serve(settings, embedded=embedded, config_path=args.config))
    finally:
        log_output.flush()


def _convert(path: str) -> int:
    """Print `path` (a pgbouncer.ini) as TOML, its warnings as comments on top."""
    ini = read_ini(path)
    if ini.problems:
        for problem in ini.problems:
            print(f"pypooler: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    header = [f"# pypooler settings converted from {path}"] + [f"# {warning}" for warning in ini.warnings]
    print("\n".join(header) + "\n\n" + to_toml(ini.values), end="")
    return 0


def _advise(args: argparse.Namespace, settings: Settings) -> int:
    """Print SHOW ADVICE from a running pypooler as a report a person reads top to bottom."""
    from pypooler.console_client import ConsoleError, console_conninfo, show

    if args.password is not None:
        print(
            "pypooler advise: --password is no longer accepted (ps shows a command line to every"
            " user of the host): set PGPASSWORD or use a .pgpass file",
            file=sys.stderr,
        )
        return EXIT_CONSOLE_ERROR
    try:
        conninfo = console_conninfo(
            settings, os.environ, dsn=args.dsn, host=args.host, port=args.port, user=args.user
        )
        columns, rows = show(conninfo, "ADVICE")
    except ConsoleError as exc:
        print(f"pypooler advise: {exc}", file=sys.stderr)
        return EXIT_CONSOLE_ERROR
    if not rows:
        print("no pools yet: no client has connected through this pypooler")
    for row in rows:
        # SHOW ADVICE's columns: database, user, verdict, culprit, the figures, advice (last).
        record = dict(zip(columns, row, strict=True))
        print(f"pool {record['database']}/{record['user']} (last {record['window_s']} s)")
        print(f"  verdict: {record['verdict']}  culprit: {record['culprit'] or '-'}")
        for name in columns[4:-1]:
            print(f"  {name:30} {record[name] if record[name] is not None else '-'}")
        for line in (record[columns[-1]] or "").split(" | "):
            print(f"  => {line}")
        print()
    return 0


async def _serve(settings: Settings, *, embedded: bool, config_path: str | None = None) -> int:
    postgres = None
    embedded_databases: dict[str, DatabaseConfig] = {}
    if embedded:
        from pypooler.embedded import EmbeddedPostgres

        postgres = EmbeddedPostgres(max_connections=100)
        await asyncio.to_thread(postgres.start)
        embedded_databases = {"*": DatabaseConfig(host=postgres.host, port=postgres.port)}
        settings = settings.model_copy(update={"databases": embedded_databases})

    def reread() -> Settings:
        fresh = load_settings(config_path)
        if embedded:  # the throwaway server stays what the pooler points at
            fresh = fresh.model_copy(update={"databases": embedded_databases})
        return fresh

    pooler = Pooler(settings, reread)
    exit_code = 0
    try:
        await pooler.start()
        # Everything alive now (modules, settings, pools) lives as long as the process: keep it
        # out of the collector's full passes, whose cost otherwise grows with all of it.
        gc.freeze()
        if postgres is not None:
            print(
                "pypooler demo: throwaway PostgreSQL on port "
                f"{postgres.port}; connect through the pooler with:\n"
                f"  psql 'postgresql://postgres@{settings.listen_addr}:{pooler.port}/pypooler_test'",
                flush=True,
            )
        exit_code = await _run_until_signalled(pooler)
    finally:
        await pooler.stop()
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
    return exit_code


async def _run_until_signalled(pooler: Pooler) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the exit status (see the module doc)."""
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    first = asyncio.Event()
    second = asyncio.Event()

    def on_stop_signal(signum: signal.Signals) -> None:
        received.append(signum)
        (first if len(received) == 1 else second).set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    pooler.on_shutdown = lambda: on_stop_signal(signal.SIGTERM)  # the console's SHUTDOWN
    loop.add_signal_handler(signal.SIGHUP, pooler.reload)
    try:
        await first.wait()
        timeout = pooler.settings.shutdown_drain_timeout
        if received[0] == signal.SIGINT:
            timeout = min(timeout, FAST_DRAIN_S)
        log.info("%s: shutting down", received[0].name)
        drain = asyncio.ensure_future(pooler.drain(timeout))
        interrupt = asyncio.ensure_future(second.wait())
        await asyncio.wait({drain, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            drain.cancel()
            log.warning("%s again: closing every connection now", received[-1].name)
            return EXIT_DRAIN_ABANDONED
        interrupt.cancel()
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


if __name__ == "__main__":
    sys.exit(main())
