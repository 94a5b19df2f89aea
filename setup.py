"""The compiled build of the hot path (mypyc), which is what a wheel and the container ship.

pyproject.toml describes the package; this file adds the compiled modules. A wheel or an install
from this repo (`pip wheel .`, `pip install .`, the Dockerfile) compiles them; when that cannot
be done (no C compiler, no Python headers, no mypy) it warns and builds the pure-Python package,
which runs the same code more slowly. The sources always ship too: PYPOOLER_PURE=1 runs them.

PYPOOLER_MYPYC=0 builds pure Python on purpose (the Makefile's editable install, which then
compiles in place with `make compile`); PYPOOLER_MYPYC=1 requires the compiled build (`make
compile`: PYPOOLER_MYPYC=1 python setup.py build_ext --inplace), failing instead of falling back.
PYPOOLER_MYPYC_MODULES (comma-separated paths) overrides the module list, for experiments.

The built package's pypooler/revision.py names the git revision it was built from:
PYPOOLER_GIT_REVISION (the Dockerfile's build argument: the image's build context has no .git),
else `git rev-parse` when building from a checkout, else "unknown".
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# One compilation group: calls and attribute reads between these modules become C calls and
# struct reads. Compiling only some of them is slower than pure Python (each crossing between
# compiled and interpreted code boxes values and checks types), so it is all of them or none.
# parameter_sets.py stays Python: a compiled dict subclass with a __weakref__ slot crashes at exit.
HOT_PATH = [
    "pypooler/protocol/transaction.py",
    "pypooler/protocol/codec.py",
    "pypooler/protocol/constants.py",
    "pypooler/protocol/errors.py",
    "pypooler/rewriting.py",
    "pypooler/prepared.py",
    "pypooler/session_state.py",
    "pypooler/session_parameters.py",
    "pypooler/stats.py",
    "pypooler/pool.py",
    "pypooler/flow.py",
    "pypooler/server.py",
    "pypooler/client.py",
    "pypooler/registry.py",
    "pypooler/protocol/login.py",
    "pypooler/protocol/server_login.py",
    "pypooler/protocol/listen.py",
    "pypooler/listening.py",
    # Logins' checks, which SQL over HTTP runs per request; and its per-request path (issue 18's
    # speed goal): the listener, the request as a pool client, the handler.
    "pypooler/auth.py",
    "pypooler/http_types.py",
    "pypooler/http_client.py",
    "pypooler/http_listener.py",
    "pypooler/sql_over_http.py",
]

PURE_FALLBACK = (
    "pypooler: building the pure-Python package instead of the compiled one ({reason}); it works"
    " the same but its hot path is slower (see README, Architecture). Install a C compiler and"
    " the Python headers (Debian: gcc python3-dev) and mypy, then build again."
)


REQUIRED = os.environ.get("PYPOOLER_MYPYC") == "1"


def warn_pure(reason: str) -> None:
    print("WARNING: " + PURE_FALLBACK.format(reason=reason), file=sys.stderr)


class AllOrNothingBuildExt(build_ext):
    """Builds the compiled group, or nothing: a group with a module missing would not import."""

    def run(self) -> None:
        if REQUIRED:
            super().run()
            return
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing: whatever the toolchain raises
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []
            warn_pure(f"the C build failed: {exc}")

    def get_outputs(self) -> list[str]:
        return super().get_outputs() if self.extensions else []


def git_revision() -> str:
    """The revision to stamp into the build: PYPOOLER_GIT_REVISION, else the checkout's HEAD."""
    revision = os.environ.get("PYPOOLER_GIT_REVISION", "").strip()
    if revision:
        return revision
    here = Path(__file__).resolve().parent
    if not (here / ".git").exists():
        return "unknown"
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else "unknown"


class StampRevision(build_py):
    """Copies the package, then writes the revision into the copy of pypooler/revision.py (never
    into the sources: an editable install builds no copy of them, and keeps "unknown")."""

    def run(self) -> None:
        super().run()
        built = Path(self.build_lib) / "pypooler" / "revision.py"
        source = Path(__file__).resolve().parent / "pypooler" / "revision.py"
        if built.exists() and not built.samefile(source):
            built.write_text(
                '"""The git revision this package was built from (setup.py wrote it)."""\n\n'
                f"GIT_REVISION = {git_revision()!r}\n"
            )


def compiled_modules() -> list[Any]:
    if os.environ.get("PYPOOLER_MYPYC", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if REQUIRED:
            raise
        warn_pure("mypy, which provides mypyc, is not installed")
        return []
    modules = os.environ.get("PYPOOLER_MYPYC_MODULES")
    return list(
        mypycify(modules.split(",") if modules else HOT_PATH, opt_level="3", group_name="pypooler.native")
    )


setup(ext_modules=compiled_modules(), cmdclass={"build_ext": AllOrNothingBuildExt, "build_py": StampRevision})
