"""The mypyc build of the hot path: `make compile` (PYPOOLER_MYPYC=1 python setup.py build_ext --inplace).

pyproject.toml describes the package; this file only adds the compiled modules, and only when
PYPOOLER_MYPYC is set: without it (pip install, the container image) pypooler is pure Python.
PYPOOLER_MYPYC_MODULES (comma-separated paths) overrides the module list, for experiments.
"""

import os

from setuptools import setup

# One compilation group: calls and attribute reads between these modules become C calls and
# struct reads. Compiling only some of them is slower than pure Python (each crossing between
# compiled and interpreted code boxes values and checks types), so it is all of them or none.
# parameter_sets.py stays Python: a compiled dict subclass with a __weakref__ slot crashes at exit.
HOT_PATH = [
    "pypooler/protocol/transaction.py",
    "pypooler/protocol/codec.py",
    "pypooler/protocol/constants.py",
    "pypooler/errors.py",
    "pypooler/rewriting.py",
    "pypooler/prepared.py",
    "pypooler/session_state.py",
    "pypooler/session_parameters.py",
    "pypooler/stats.py",
    "pypooler/pool.py",
    "pypooler/server.py",
    "pypooler/client.py",
    "pypooler/protocol/listen.py",
    "pypooler/listening.py",
]

ext_modules = []
if os.environ.get("PYPOOLER_MYPYC"):
    from mypyc.build import mypycify

    modules = os.environ.get("PYPOOLER_MYPYC_MODULES")
    ext_modules = mypycify(
        modules.split(",") if modules else HOT_PATH, opt_level="3", group_name="pypooler.native"
    )

setup(ext_modules=ext_modules)
