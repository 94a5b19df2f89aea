#!/bin/sh
# pypooler's container entrypoint (POSIX sh: the slim image's /bin/sh is dash).
#
#   docker-entrypoint.sh [run] [--config FILE]   check the config, then exec `pypooler run`
#   docker-entrypoint.sh healthcheck [PATH]      GET http://127.0.0.1:<metrics_port>/healthz
#   docker-entrypoint.sh drain [DELAY]           for a preStop hook: wait DELAY seconds, send
#                                                SIGTERM, wait until pypooler has drained
#   docker-entrypoint.sh check-config|advise ... any other pypooler command
#   docker-entrypoint.sh CMD ...                 anything else runs as given (e.g. sh)
#
# `run` execs pypooler in this process, so pypooler is PID 1 and gets the container's signals
# itself; the PID is written to $PYPOOLER_PIDFILE for `drain`. Configuration comes from the
# file named by $PYPOOLER_CONFIG and PYPOOLER_* variables, exactly as `pypooler run` reads it.
set -eu

pidfile="${PYPOOLER_PIDFILE:-/tmp/pypooler.pid}"
python="${PYPOOLER_PYTHON:-python3}"

# Reads one setting the way pypooler does (file + environment), so the helpers below follow
# whatever the operator configured instead of assuming defaults.
setting() {
    "$python" -c 'import sys
from pypooler.config import load_settings
print(getattr(load_settings(), sys.argv[1]))' "$1"
}

run() {
    # Without a [databases] entry `pypooler run` starts a throwaway PostgreSQL, which a
    # container does not have: say what to configure instead. Config errors exit 2 here, one
    # line each, before anything listens.
    summary="$(pypooler check-config "$@")"
    case "$summary" in
        "config ok: 0 database entries")
            echo "docker-entrypoint: no databases configured: mount a config file at" \
                "${PYPOOLER_CONFIG:-<PYPOOLER_CONFIG>} with a [databases.NAME] table, or set" \
                "PYPOOLER_DATABASES__<NAME>__HOST (and __PORT, __USER, __PASSWORD)" >&2
            exit 2
            ;;
    esac
    echo "$$" >"$pidfile"
    exec pypooler run "$@"
}

healthcheck() {
    path="${1:-/healthz}"
    port="$(setting metrics_port)"
    "$python" -c 'import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)' "$port" "$path"
}

drain() {
    # A preStop hook: give load balancers DELAY seconds to stop sending new clients, then ask
    # pypooler to drain and wait for it, so the kubelet's own SIGTERM (which would be a second
    # signal, "exit at once") finds it gone. Bounded by the drain timeout plus a margin.
    delay="${1:-0}"
    sleep "$delay"
    [ -s "$pidfile" ] || { echo "docker-entrypoint: no pid file $pidfile" >&2; exit 1; }
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || exit 0
    timeout="$(setting shutdown_drain_timeout)"
    deadline=$(( $(date +%s) + ${timeout%.*} + 5 ))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "docker-entrypoint: pypooler still running" >&2; exit 1; }
        sleep 0.2
    done
}

[ "$#" -gt 0 ] || set -- run
case "$1" in
    -*) run "$@" ;;
    run) shift; run "$@" ;;
    healthcheck) shift; healthcheck "$@" ;;
    drain) shift; drain "$@" ;;
    check-config | advise | demo) exec pypooler "$@" ;;
    *) exec "$@" ;;
esac
