"""The report of one `bench.run`: report.md and the PNG plots beside it.

Rules: every cell is a median over the rounds that produced it, with the per-round values in
brackets where noise matters (success rates, ratios), and ratios are taken within a round; the
plots show each round's value as a dot over the median bar, so the spread is visible too.
Nothing here measures; it only reads a `Run`.
"""

from __future__ import annotations

import datetime
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench import compare
from bench.run import HOLD_TIMES_S, HTTP_DIRECT, HTTP_SQL, HTTP_WS, IdleResult, LoadResult, Run

TARGETS = ("direct", "PgBouncer", "pypooler")
HTTP_TARGETS = (HTTP_DIRECT, HTTP_SQL, HTTP_WS)
COLORS = {
    "direct": "#9e9e9e", "PgBouncer": "#4c72b0", "pypooler": "#dd8452",
    HTTP_DIRECT: "#9e9e9e", HTTP_SQL: "#dd8452", HTTP_WS: "#c44e52",
}  # fmt: skip
DPI = 110


def median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def per_round(values: Sequence[float | None], spec: str, scale: float = 1.0) -> str:
    return ", ".join(fmt(value, spec, scale) for value in values)


def errors_cell(results: Sequence[LoadResult], limit: int = 2) -> str:
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result.errors)
    if not errors:
        return "none"
    shown = [f'{count:,} x "{message.replace("|", "/")}"' for message, count in errors.most_common(limit)]
    if len(errors) > limit:
        shown.append(f"{sum(errors.values()) - sum(c for _, c in errors.most_common(limit)):,} other")
    return "; ".join(shown)


def group(results: Sequence[LoadResult], point: str, target: str) -> list[LoadResult]:
    return sorted((r for r in results if r.point == point and r.target == target), key=lambda r: r.round_no)


def ratio_per_round(
    results: Sequence[LoadResult],
    point: str,
    value: Callable[[LoadResult], float],
    numerator: str = "pypooler",
    denominator: str = "PgBouncer",
) -> list[float | None]:
    ours = {r.round_no: r for r in group(results, point, numerator)}
    theirs = {r.round_no: r for r in group(results, point, denominator)}
    ratios: list[float | None] = []
    for round_no in sorted(ours):
        if round_no in theirs and value(theirs[round_no]) > 0:
            ratios.append(value(ours[round_no]) / value(theirs[round_no]))
        else:
            ratios.append(None)
    return ratios


# -- tables ----------------------------------------------------------------------------------


def proxy_cpu_us(result: LoadResult) -> float | None:
    """CPU of the process in front of PostgreSQL (pypooler, PgBouncer, the WebSocket relay)
    per successful invocation; None for direct TCP, which has none."""
    cpu = result.extra.get("proxy_cpu_s")
    return cpu / result.ok * 1e6 if cpu is not None and result.ok else None


def fanout_table(
    results: Sequence[LoadResult],
    targets: Sequence[str] = TARGETS,
    baseline: str = "PgBouncer",
    ratio_header: str = "pypooler/PgBouncer invocations/s (per round)",
) -> str:
    """One row per point and target; the ratio column is each target's invocations/s over
    `baseline`'s, on the rows of the targets after it (pypooler's alone for TCP)."""
    lines = [
        "| N | target | success % (per round) | errors, by message (all rounds) | p50 ms | p95 ms | p99 ms"
        f" | invocations/s | proxy CPU µs per invocation | {ratio_header} |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    points = sorted({r.point for r in results}, key=lambda p: int(p.split("=")[1]))
    compared = targets[targets.index(baseline) + 1 :]
    for point in points:
        for target in targets:
            runs = group(results, point, target)
            if not runs:
                continue
            success = [r.success for r in runs]
            ratio = ""
            if target in compared:
                ratios = ratio_per_round(results, point, lambda r: r.throughput, target, baseline)
                ratio = f"**{fmt(median(ratios), '.2f')}** ({per_round(ratios, '.2f')})"
            lines.append(
                f"| {point.split('=')[1]} | {target} | {fmt(median(success), '.1f', 100)}"
                f" ({per_round(success, '.1f', 100)}) | {errors_cell(runs)}"
                f" | {fmt(median([r.quantile(0.5) for r in runs]), ',.0f', 1000)}"
                f" | {fmt(median([r.quantile(0.95) for r in runs]), ',.0f', 1000)}"
                f" | {fmt(median([r.quantile(0.99) for r in runs]), ',.0f', 1000)}"
                f" | {fmt(median([r.throughput for r in runs]), ',.0f')}"
                f" | {fmt(median([proxy_cpu_us(r) for r in runs]), ',.0f')} | {ratio} |"
            )
    return "\n".join(lines)


def peak_connections(result: LoadResult) -> float | None:
    samples = result.extra.get("pg_samples") or []
    return max((sample[1] for sample in samples), default=None)


def mean_connections(result: LoadResult) -> float | None:
    samples = result.extra.get("pg_samples") or []
    return statistics.fmean(sample[1] for sample in samples) if samples else None


def autoscale_table(results: Sequence[LoadResult]) -> str:
    lines = [
        "| target | requests | succeeded % (per round) | errors, by message (all rounds) | p50 ms | p99 ms"
        " | server connections in pg_stat_activity: peak (mean) |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for target in ("direct", "pypooler"):
        runs = group(results, "12 x 25", target)
        if not runs:
            continue
        success = [r.success for r in runs]
        peaks = [peak_connections(r) for r in runs]
        means = [mean_connections(r) for r in runs]
        lines.append(
            f"| {target} | {fmt(median([float(r.offered) for r in runs]), ',.0f')}"
            f" | {fmt(median(success), '.1f', 100)} ({per_round(success, '.1f', 100)})"
            f" | {errors_cell(runs)}"
            f" | {fmt(median([r.quantile(0.5) for r in runs]), ',.0f', 1000)}"
            f" | {fmt(median([r.quantile(0.99) for r in runs]), ',.0f', 1000)}"
            f" | {per_round(peaks, '.0f')} ({per_round(means, '.0f')}) |"
        )
    return "\n".join(lines)


def hold_row_values(result: LoadResult) -> dict[str, float | None]:
    from bench.run import histogram_quantile

    hold = result.extra.get("hold") or {}
    wait = result.extra.get("wait") or {}
    xacts = hold.get("count") or 0.0
    served_rate = xacts / result.wall_s if result.wall_s else None
    mean_hold = hold["sum"] / xacts if xacts else None
    metrics = result.extra.get("metrics_samples") or []
    buckets = wait.get("buckets") or []
    # The first bucket (<= 100 µs) is "a server was idle": pypooler records 0 for those.
    waited = 1 - buckets[0][1] / buckets[-1][1] if buckets and buckets[-1][1] else None
    return {
        "offered_need": result.extra["rate"] * result.extra["hold_target_s"],
        "served_rate": served_rate,
        "mean_hold": mean_hold,
        "little": served_rate * mean_hold if served_rate is not None and mean_hold is not None else None,
        "active": statistics.fmean(s[2] for s in metrics) if metrics else None,
        "waiting_peak": max((s[1] for s in metrics), default=None),
        "wait_p50": histogram_quantile(buckets, 0.5),
        "wait_p99": histogram_quantile(buckets, 0.99),
        "waited": waited,
        "p99": result.quantile(0.99),
    }


def hold_table(results: Sequence[LoadResult], pool_size: int) -> str:
    lines = [
        "| hold per transaction | arrivals/s x hold = servers needed | pypooler: transactions/s"
        " | mean hold ms | busy servers = rate x hold (Little) | active servers, sampled mean"
        " | pool_size | checkouts that waited | checkout wait p50 / p99 ms | peak waiting clients"
        " | client p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for hold_s in HOLD_TIMES_S:
        point = f"hold {hold_s * 1000:.0f} ms"
        runs = group(results, point, "pypooler")
        if not runs:
            continue
        rows = [hold_row_values(r) for r in runs]

        def col(key: str, rows: list[dict[str, float | None]] = rows) -> float | None:
            return median([row[key] for row in rows])

        lines.append(
            f"| {hold_s * 1000:.0f} ms | {fmt(col('offered_need'), '.1f')}"
            f" | {fmt(col('served_rate'), '.0f')} | {fmt(col('mean_hold'), '.1f', 1000)}"
            f" | {per_round([row['little'] for row in rows], '.1f')}"
            f" | {per_round([row['active'] for row in rows], '.1f')} | {pool_size}"
            f" | {fmt(col('waited'), '.0%')}"
            f" | {fmt(col('wait_p50'), ',.1f', 1000)} / {fmt(col('wait_p99'), ',.1f', 1000)}"
            f" | {fmt(col('waiting_peak'), '.0f')} | {fmt(col('p99'), ',.0f', 1000)} | {errors_cell(runs)} |"
        )
    return "\n".join(lines)


def idle_table(results: Sequence[IdleResult]) -> str:
    lines = [
        "| proxy | idle clients logged in (per round) | RSS before → with clients, MiB (per round)"
        " | KiB per idle client (per round) | login of all clients, s |",
        "|---|---|---|---|---:|",
    ]
    for target in ("PgBouncer", "pypooler"):
        runs = sorted((r for r in results if r.target == target), key=lambda r: r.round_no)
        if not runs:
            continue
        per = [r.kib_per_client for r in runs]
        rss = ", ".join(f"{r.rss_before_kib / 1024:.1f} → {r.rss_after_kib / 1024:.1f}" for r in runs)
        lines.append(
            f"| {target} | {', '.join(f'{r.ok:,}/{r.clients:,}' for r in runs)} | {rss}"
            f" | **{fmt(median(per), '.1f')}** ({per_round(per, '.1f')})"
            f" | {fmt(median([r.login_s for r in runs]), '.1f')} |"
        )
    return "\n".join(lines)


def summary_table(run: Run) -> str:
    """The few numbers the README shows: one row per scenario, medians over rounds."""
    rows: list[str] = ["| | direct | PgBouncer | pypooler |", "|---|---|---|---|"]
    if run.fanout:
        biggest = max((r.point for r in run.fanout), key=lambda p: int(p.split("=")[1]))
        cells = []
        for target in TARGETS:
            runs = group(run.fanout, biggest, target)
            cells.append(
                f"{fmt(median([r.success for r in runs]), '.1f', 100)}% ok, p99"
                f" {fmt(median([r.quantile(0.99) for r in runs]), ',.0f', 1000)} ms"
                if runs
                else "-"
            )
        rows.append(
            f"| serverless fan-out, {biggest.split('=')[1]} concurrent invocations | "
            + " | ".join(cells)
            + " |"
        )
    if run.http_fanout:
        biggest = max((r.point for r in run.http_fanout), key=lambda p: int(p.split("=")[1]))

        def outcome(target: str) -> str:
            runs = group(run.http_fanout, biggest, target)
            if not runs:
                return "-"
            return (
                f"{fmt(median([r.success for r in runs]), '.1f', 100)}% ok, p99"
                f" {fmt(median([r.quantile(0.99) for r in runs]), ',.0f', 1000)} ms"
            )

        rows.append(
            f"| edge fan-out with @neondatabase/serverless, {biggest.split('=')[1]} concurrent"
            f" invocations | WebSocket-to-TCP relay: {outcome(HTTP_DIRECT)} | (no HTTP or WebSocket)"
            f" | `POST /sql`: {outcome(HTTP_SQL)}; WebSocket: {outcome(HTTP_WS)} |"
        )
    if run.autoscale:
        cells = []
        for target in ("direct", "PgBouncer", "pypooler"):
            runs = group(run.autoscale, "12 x 25", target)
            if not runs:
                cells.append("-")
                continue
            failed = median([1 - r.success for r in runs])
            p99 = median([r.quantile(0.99) for r in runs])
            cells.append(
                f"{fmt(failed, '.1%', 1)} failed, p99 {fmt(p99, ',.0f', 1000)} ms,"
                f" peak {fmt(median([peak_connections(r) for r in runs]), '.0f')} server conns"
            )
        rows.append(
            "| autoscale outage, 12 instances x pool 25, max_connections 100 | " + " | ".join(cells) + " |"
        )
    if run.pgbench:
        for label in ("-S c=100", "TPC-B c=100", "-S c=1000", "-S -C c=20"):
            results = [r for r in run.pgbench if r.point.label == label]
            if not results:
                continue
            cells = []
            for target in TARGETS:
                ok = [r for r in results if r.target == target and r.ok]
                if not ok:
                    tried = [r for r in results if r.target == target]
                    cells.append(f"failed: {compare.short(tried[0].error or '?', 40)}" if tried else "-")
                    continue
                cpu = median([r.cpu_us_per_xact for r in ok])
                cells.append(
                    f"{fmt(median([r.tps for r in ok]), ',.0f')} tps"
                    + ("" if cpu is None else f", {cpu:.0f} µs CPU/xact")
                )
            rows.append(f"| pgbench {label} | " + " | ".join(cells) + " |")
    if run.idle:
        cells = ["-"]
        for target in ("PgBouncer", "pypooler"):
            idle = [r for r in run.idle if r.target == target]
            cells.append(f"{fmt(median([r.kib_per_client for r in idle]), '.1f')} KiB" if idle else "-")
        clients = max(r.clients for r in run.idle)
        rows.append(f"| memory per idle client ({clients:,} clients) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- plots -----------------------------------------------------------------------------------


def grouped_bars(
    ax: Axes,
    results: Sequence[LoadResult],
    points: Sequence[str],
    value: Callable[[LoadResult], float | None],
    targets: Sequence[str] = TARGETS,
) -> None:
    width = 0.8 / len(targets)
    for t_index, target in enumerate(targets):
        for p_index, point in enumerate(points):
            runs = group(results, point, target)
            values = [v for v in (value(r) for r in runs) if v is not None]
            x = p_index + (t_index - (len(targets) - 1) / 2) * width
            if values:
                ax.bar(x, statistics.median(values), width * 0.9, color=COLORS[target],
                       label=target if p_index == 0 else None)  # fmt: skip
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
            else:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(points)), [p.replace("N=", "") for p in points])


def plot_fanout(
    results: Sequence[LoadResult],
    path: Path,
    targets: Sequence[str] = TARGETS,
    invocation: str = "connect, SELECT 1, close",
    title: str = "Serverless fan-out against PostgreSQL max_connections = 100 (dots: rounds)",
) -> None:
    points = sorted({r.point for r in results}, key=lambda p: int(p.split("=")[1]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    grouped_bars(axes[0], results, points, lambda r: r.success * 100, targets)
    axes[0].set_title("invocations that succeeded (%)")
    axes[0].set_ylim(0, 105)
    grouped_bars(axes[1], results, points, lambda r: q * 1000 if (q := r.quantile(0.99)) else None, targets)
    axes[1].set_title("p99 end-to-end latency (ms, log)")
    axes[1].set_yscale("log")
    grouped_bars(axes[2], results, points, lambda r: r.throughput, targets)
    axes[2].set_title("successful invocations per second")
    for ax in axes:
        ax.set_xlabel(f"concurrent invocations (each: {invocation})")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_autoscale(results: Sequence[LoadResult], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
    for result in results:
        samples = result.extra.get("pg_samples") or []
        if samples:
            axes[0].plot([s[0] for s in samples], [s[1] for s in samples], color=COLORS[result.target],
                         alpha=1.0 if result.round_no == 1 else 0.5,
                         label=f"{result.target}, round {result.round_no}")  # fmt: skip
    axes[0].axhline(100, color="red", linestyle="--", linewidth=1, label="max_connections 100")
    axes[0].set_title("server connections in pg_stat_activity")
    axes[0].set_xlabel("seconds into the run")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    targets = ("direct", "pypooler")
    grouped_bars(axes[1], results, ["12 x 25"], lambda r: (1 - r.success) * 100, targets)
    axes[1].set_title("requests that failed (%)")
    axes[1].set_xticks([0], ["12 instances x pool 25"])
    axes[1].legend()
    fig.suptitle("The autoscale outage replayed: demand 12 x 25 = 300 connections vs 100")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def bucket_label(bound: float) -> str:
    if bound == float("inf"):
        return "> 60 s"
    if bound < 0.001:
        return f"≤ {bound * 1e6:g} µs"
    if bound < 1:
        return f"≤ {bound * 1000:g} ms"
    return f"≤ {bound:g} s"


def plot_hold(results: Sequence[LoadResult], pool_size: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    colors = {HOLD_TIMES_S[0]: "#55a868", HOLD_TIMES_S[1]: "#c44e52"}
    width = 0.4
    labels: list[str] = []
    for index, hold_s in enumerate(HOLD_TIMES_S):
        runs = [r for r in results if r.extra.get("hold_target_s") == hold_s and r.round_no == 1]
        if not runs or not runs[0].extra.get("wait"):
            continue
        buckets = runs[0].extra["wait"]["buckets"]
        total = buckets[-1][1] or 1
        counts = [cumulative - (buckets[i - 1][1] if i else 0) for i, (_, cumulative) in enumerate(buckets)]
        labels = [bucket_label(bound) for bound, _ in buckets]
        xs = [i + (index - 0.5) * width for i in range(len(counts))]
        axes[0].bar(xs, [c / total * 100 for c in counts], width, color=colors[hold_s],
                    label=f"hold {hold_s * 1000:.0f} ms")  # fmt: skip
        samples = runs[0].extra.get("metrics_samples") or []
        if samples:
            axes[1].plot([s[0] for s in samples], [s[1] for s in samples], color=colors[hold_s],
                         label=f"waiting clients, hold {hold_s * 1000:.0f} ms")  # fmt: skip
            axes[1].plot([s[0] for s in samples], [s[2] for s in samples], color=colors[hold_s],
                         linestyle=":", label=f"servers in use, hold {hold_s * 1000:.0f} ms")  # fmt: skip
    if labels:
        axes[0].set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    axes[0].set_title("pypooler checkout wait (% of checkouts per bucket)")
    axes[0].legend()
    axes[1].axhline(pool_size, color="gray", linestyle="--", linewidth=0.8, label=f"pool_size {pool_size}")
    axes[1].set_title("pypooler /metrics during the run")
    axes[1].set_xlabel("seconds into the run")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Hold time is the lever: same arrivals, 5 ms vs 200 ms per transaction (round 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_pgbench(run: Run, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, tpcb in ((axes[0], False), (axes[1], True)):
        points = [p for p in run.scale.pgbench_points if p.tpcb == tpcb and not p.reconnect]
        for target in TARGETS:
            xs, ys = [], []
            for point in points:
                ok = [r.tps for r in run.pgbench if r.point == point and r.target == target and r.ok]
                for tps in ok:
                    ax.scatter([point.clients], [tps], color=COLORS[target], s=8)
                if ok:
                    xs.append(point.clients)
                    ys.append(statistics.median([t for t in ok if t is not None]))
            if xs:
                ax.plot(xs, ys, marker="o", color=COLORS[target], label=target)
        ax.set_xscale("log")
        ax.set_xlabel("pgbench clients (-c)")
        ax.set_title(f"pgbench {'TPC-B-like' if tpcb else '-S'}: tps (direct fails past 100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    labels: list[str] = []
    for index, point in enumerate(run.scale.pgbench_points):
        labels.append(point.label)
        for t_index, target in enumerate(("PgBouncer", "pypooler")):
            cpu = [r.cpu_us_per_xact for r in run.pgbench if r.point == point and r.target == target and r.ok]
            values = [c for c in cpu if c is not None]
            if values:
                x = index + (t_index - 0.5) * 0.4
                axes[2].bar(x, statistics.median(values), 0.36, color=COLORS[target],
                            label=target if index == 0 else None)  # fmt: skip
                axes[2].scatter([x] * len(values), values, color="black", s=8, zorder=3)
    axes[2].set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    axes[2].set_title("proxy CPU per transaction (µs)")
    axes[2].legend(fontsize=8)
    axes[2].grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_idle(results: Sequence[IdleResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for index, target in enumerate(("PgBouncer", "pypooler")):
        values = [v for v in (r.kib_per_client for r in results if r.target == target) if v is not None]
        if values:
            ax.bar(index, statistics.median(values), 0.6, color=COLORS[target])
            ax.scatter([index] * len(values), values, color="black", s=8, zorder=3)
    ax.set_xticks([0, 1], ["PgBouncer", "pypooler"])
    clients = max((r.clients for r in results), default=0)
    ax.set_title(f"RSS per idle client, KiB ({clients:,} clients)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# -- the report ------------------------------------------------------------------------------


def write(run: Run, out_dir: Path, *, machine: str, elapsed_s: float, started: datetime.datetime,
          quick: bool) -> str:  # fmt: skip
    pool_size = compare.POOL_SIZE
    parts = [
        f"# pypooler benchmark, {started:%Y-%m-%d %H:%M} UTC{' (--quick)' if quick else ''}",
        "",
        f"Machine: {machine}. Whole run {elapsed_s / 60:.1f} min, {run.rounds} rounds per point.",
        "",
        f"Setup: one throwaway PostgreSQL with max_connections {compare.PG_MAX_CONNECTIONS};"
        f" PgBouncer and pypooler in transaction mode with pool size {pool_size},"
        " server_idle_timeout 2 s (direct runs first wait for the pools to hand their servers"
        " back); clients run in separate processes on the same machine, so every number"
        " includes the competition for its cores.",
        "",
        "## Summary",
        "",
        summary_table(run),
    ]
    if run.fanout:
        plot_fanout(run.fanout, out_dir / "fanout.png")
        parts += [
            "", "## Serverless fan-out", "",
            "N concurrent invocations, each with its own asyncpg connection (connect, `SELECT 1`,"
            " close; statement_cache_size=0), all N starting at one instant from"
            f" {run.scale.fanout_client_procs} client processes; {run.scale.fanout_bursts} burst(s)"
            f" per point and round; an invocation gives up after 30 s. Latency is end to end from"
            " the burst's start; invocations/s is successes over the bursts' wall time; proxy CPU"
            " is the proxy process's utime + stime (/proc/PID/stat) over the bursts per successful"
            " invocation.",
            "", fanout_table(run.fanout), "", "![fan-out](fanout.png)",
        ]  # fmt: skip
    if run.http_fanout:
        plot_fanout(
            run.http_fanout, out_dir / "http-fanout.png", HTTP_TARGETS,
            invocation="the driver's SELECT 1",
            title="Edge fan-out with @neondatabase/serverless, max_connections = 100 (dots: rounds)",
        )  # fmt: skip
        beside = "![TCP fan-out](fanout.png) " if run.fanout else ""
        parts += [
            "", "## Serverless fan-out over HTTP and WebSocket (@neondatabase/serverless)", "",
            "N concurrent edge-function invocations with the real driver (`bench/neon_fanout.mjs`,"
            " node, tests/node's `@neondatabase/serverless`), all N starting at one instant from"
            f" {run.scale.fanout_client_procs} client processes; {run.scale.fanout_bursts} burst(s)"
            " per point and round; 30 s budget per invocation; latency end to end from the burst's"
            f" start. {HTTP_DIRECT}: the driver's `Client` (connect, `SELECT 1`, end) through"
            " `bench.wsproxy`, a plain WebSocket-to-TCP relay (one PostgreSQL connection per"
            f" WebSocket, no pooling: what the driver's users run without pypooler). {HTTP_SQL}:"
            " `neon()`'s one-shot `SELECT 1` (an HTTP request; node's fetch keeps connections"
            f" alive between invocations of one process). {HTTP_WS}: the same `Client` script"
            f" against pypooler's HTTP listener (pool_size {compare.POOL_SIZE}). Every target logs in"
            " by trust, so the `Client` runs with `pipelineConnect = false` (the driver's default"
            ' `"password"` needs `auth_type = plain` in pypooler, or password auth in PostgreSQL).'
            " Proxy CPU: pypooler's, or the relay's for the direct target, per successful"
            " invocation. The ratio column is each target's invocations/s over the relay's, within"
            " a round.",
            "",
            fanout_table(
                run.http_fanout, HTTP_TARGETS, HTTP_DIRECT,
                f"invocations/s over {HTTP_DIRECT}'s (per round)",
            ),
            "", f"{beside}![HTTP fan-out](http-fanout.png)",
        ]  # fmt: skip
    if run.autoscale:
        plot_autoscale(run.autoscale, out_dir / "autoscale.png")
        parts += [
            "", "## The autoscale outage replayed", "",
            "12 application instances, each with its own asyncpg pool (min 0, max 25, growing on"
            " demand like SQLAlchemy's QueuePool), open-loop Poisson arrivals for"
            f" {run.scale.autoscale_duration_s:.0f} s at {run.scale.autoscale_rate:.0f} requests/s"
            " in all. A request checks a connection out (5 s checkout timeout), runs `SELECT 1`,"
            " spends 400 ms on work that is not the database's, runs `SELECT 1` again and gives"
            " the connection back, so each pool grows toward 25: demand 300 connections against"
            " max_connections 100. Direct vs the same instances through one pypooler"
            f" (pool_size {pool_size}). Server connections are sampled every 100 ms over a"
            " connection opened before the load.",
            "", autoscale_table(run.autoscale), "", "![autoscale](autoscale.png)",
        ]  # fmt: skip
    if run.hold:
        plot_hold(run.hold, pool_size, out_dir / "hold.png")
        parts += [
            "", "## Hold time is the lever", "",
            f"One application, open-loop arrivals at {run.scale.hold_rate:.0f}/s for"
            f" {run.scale.hold_duration_s:.0f} s through pypooler (pool_size {pool_size}); each"
            " request is one transaction: `BEGIN; SELECT 1;` then the client holds the"
            " transaction open 5 ms or 200 ms (work done inside the transaction), `COMMIT`."
            " Little's law: servers needed = arrival rate x hold. The pypooler columns come"
            " from its own /metrics (this run's application_name only): transactions/s and mean"
            " hold from `pypooler_hold_seconds`, the wait quantiles from"
            " `pypooler_checkout_wait_seconds` buckets, waiting clients and servers in use from"
            " `pypooler_clients{state=\"waiting\"}` and `pypooler_servers{state=\"active\"}`"
            " sampled every 250 ms.",
            "", hold_table(run.hold, pool_size), "", "![hold](hold.png)",
        ]  # fmt: skip
    if run.pgbench:
        plot_pgbench(run, out_dir / "pgbench.png")
        parts += [
            "", "## pgbench: throughput, latency, proxy CPU per transaction", "",
            f"`pgbench -n -M simple -T {run.scale.pgbench_duration_s} -j 2` with `-S` (one"
            " indexed SELECT), the built-in TPC-B-like script (5 statements in BEGIN..END) and"
            " `-S -C` (a new connection per transaction), scale 10. µs/xact is the proxy"
            " process's CPU (user + system) per transaction. Direct fails by design past 100"
            " clients.",
            "", compare.render_table(run.pgbench, list(run.scale.pgbench_points), run.rounds),
            "", "![pgbench](pgbench.png)",
        ]  # fmt: skip
    if run.idle:
        plot_idle(run.idle, out_dir / "idle.png")
        parts += [
            "", "## Memory per idle client", "",
            f"{run.scale.idle_clients:,} clients log in (startup, ReadyForQuery) from 10 source"
            " addresses 127.0.0.2-11 and stay idle; each round uses freshly started proxies."
            " KiB per client = (RSS with the clients - RSS before) / clients.",
            "", idle_table(run.idle), "", "![idle](idle.png)",
        ]  # fmt: skip
    if run.notes:
        parts += [
            "",
            "## Notes",
            "",
            *[note if note.startswith(("-", " ")) else f"- {note}" for note in run.notes],
        ]
    text = "\n".join(parts) + "\n"
    (out_dir / "report.md").write_text(text)
    return text
