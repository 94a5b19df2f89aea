"""Times both forms of each `codec.NATIVE` branch in the build that runs, on representative input.

    make compile && .venv/bin/python -m bench.native_paths         # the compiled build
    PYPOOLER_PURE=1 .venv/bin/python -m bench.native_paths         # the Python sources

The forms are the kernels of bench/native_forms.py: from the sources they run as Python; under
the compiled build a copy is compiled with mypyc first (a few seconds), as the hot-path modules
are. CPU time (process_time), the minimum of several repeats with the two forms alternating, in
ns per message (headers) or per statement (suspect text). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from pypooler.protocol import codec
from pypooler.protocol import constants as c

ROOT = Path(__file__).resolve().parent.parent
Kernel = Callable[[bytes, int], int]

SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"
UPDATE = "UPDATE pgbench_accounts SET abalance = abalance + -4211 WHERE aid = 712046;"
ORM = (
    "SELECT orders.order_id, orders.customer_id, orders.created_at, orders.total_amount, "
    "customers.display_name, customers.email_address FROM orders JOIN customers ON "
    "customers.customer_id = orders.customer_id WHERE orders.created_at >= $1 AND "
    "orders.status_code = $2 ORDER BY orders.created_at DESC LIMIT 50"
)
LONG = "SELECT " + ", ".join(f"t.col_{i} AS value_{i}" for i in range(40)) + " FROM wide_table t"

HEADER_INPUTS = {
    "pgbench -S reply (T D C Z)": codec.build_row_description([("abalance", c.OID_INT4)])
    + codec.build_data_row(["0"])
    + codec.build_command_complete("SELECT 1")
    + codec.build_ready_for_query(),
    "extended batch (P B D E S)": codec.build_parse(b"", SELECT.encode() + b"\0\0\0")
    + codec.build_message(c.F_BIND, b"\0\0\0\0\0\0\0\0")
    + codec.build_message(c.F_DESCRIBE, b"P\0")
    + codec.build_message(c.F_EXECUTE, b"\0\0\0\0\0")
    + codec.SYNC,
    "1,000 DataRows": codec.build_row_description([("n", c.OID_INT4)])
    + b"".join(codec.build_data_row([str(i)]) for i in range(1000))
    + codec.build_command_complete("SELECT 1000")
    + codec.build_ready_for_query(),
    "one Query (feed_to's fast path)": codec.build_query(SELECT),
}
SUSPECT_INPUTS = {
    f"pgbench -S SELECT ({len(SELECT)} B)": codec.build_query(SELECT),
    f"pgbench UPDATE ({len(UPDATE)} B)": codec.build_query(UPDATE),
    f"ORM-style, underscores ({len(ORM)} B)": codec.build_query(ORM),
    f"40 columns ({len(LONG)} B)": codec.build_query(LONG),
}


def compiled_kernels(directory: Path) -> ModuleType:
    """bench/native_forms.py compiled with mypyc in `directory`, imported."""
    shutil.copy(ROOT / "bench" / "native_forms.py", directory / "native_forms.py")
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "mypyc", "native_forms.py"],
        cwd=directory, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    sys.path.insert(0, str(directory))
    module = importlib.import_module("native_forms")
    assert not module.__file__ or not module.__file__.endswith(".py"), module.__file__
    return module


def per_op_ns(kernel: Kernel, data: bytes, times: int) -> float:
    start = time.process_time_ns()
    kernel(data, times)
    return (time.process_time_ns() - start) / times


def compare(
    forms: dict[str, Kernel], data: bytes, ops_per_call: int, repeats: int, sample_s: float
) -> dict[str, list[float]]:
    """ns per operation of each form, `repeats` samples each, the forms alternating; a sample
    runs about `sample_s` seconds of the slower form."""
    first = next(iter(forms.values()))
    slowest = 0.0
    for name, kernel in forms.items():
        assert kernel(data, 1) == first(data, 1), name  # the same answer
        slowest = max(slowest, min(per_op_ns(kernel, data, 20) for _ in range(3)))  # and warm
    times = max(1, int(sample_s * 1e9 / slowest))
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, kernel in forms.items():
            samples[name].append(per_op_ns(kernel, data, times) / ops_per_call)
    return samples


def message_count(data: bytes) -> int:
    return len(codec.MessageReader(max_message=1 << 30).feed(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sample-seconds", type=float, default=0.05, help="CPU time per sample")
    args = parser.parse_args()
    build = "compiled" if codec.NATIVE else "sources"
    with tempfile.TemporaryDirectory(prefix="native_paths-") as tmp:
        if codec.NATIVE:
            kernels = compiled_kernels(Path(tmp))
        else:
            kernels = importlib.import_module("bench.native_forms")
        python = platform.python_version()
        print(f"{build} build; Python {python}; {args.repeats} repeats, CPU time, min (median)")
        print()
        print("| build | branch: form in use vs other | input | in use, ns | other, ns | other / in use |")
        print("|---|---|---|---:|---:|---:|")
        branches = [
            (
                "header read",
                HEADER_INPUTS,
                {"indexing": kernels.walk_indexing, "unpack_header": kernels.walk_unpacking},
                message_count,
            ),
            (
                "suspect text",
                SUSPECT_INPUTS,
                {"byte loop": kernels.suspect_by_loop, "regex": kernels.suspect_by_regex},
                lambda data: 1,
            ),
        ]
        for branch, inputs, forms, ops in branches:
            native_form = next(iter(forms))  # the form `if NATIVE:` picks: listed first
            for label, data in inputs.items():
                samples = compare(forms, data, ops(data), args.repeats, args.sample_seconds)
                this = native_form if codec.NATIVE else next(n for n in forms if n != native_form)
                other = next(n for n in forms if n != this)
                a, b = min(samples[this]), min(samples[other])
                print(
                    f"| {build} | {branch}: {this} vs {other} | {label} "
                    f"| {a:.1f} ({statistics.median(samples[this]):.1f}) "
                    f"| {b:.1f} ({statistics.median(samples[other]):.1f}) | {b / a:.2f} |"
                )


if __name__ == "__main__":
    main()
