"""pypooler: an async PostgreSQL connection pooler."""

import os
import sys
import warnings
from pathlib import Path

__version__ = "0.1.0"


def _stale_extension() -> str | None:
    """A mypyc-built module (x.*.so) older than its source x.py: an in-place build that edits
    made stale, which the import system would still prefer to the source. Only in a source
    checkout (setup.py beside the package): an installed wheel's file times say nothing."""
    package = Path(__path__[0])
    if not (package.parent / "setup.py").exists():
        return None
    for extension in package.rglob("*.so"):
        source = extension.with_name(extension.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
            return str(source)
    return None


_pure = bool(os.environ.get("PYPOOLER_PURE"))
if not _pure and (_stale := _stale_extension()) is not None:
    warnings.warn(
        f"pypooler: {_stale} is newer than its compiled module; running the Python source"
        " (rebuild with `make compile`, or delete pypooler/**/*.so)",
        RuntimeWarning,
        stacklevel=1,
    )
    _pure = True

if _pure:
    # A mypyc build leaves pypooler/x.*.so next to x.py, and the import system prefers the .so.
    # PYPOOLER_PURE=1 loads every pypooler module from its source instead: for tests that hand
    # duck-typed fakes to the pool (compiled code checks argument types), and for profiling.
    from importlib.machinery import SOURCE_SUFFIXES, FileFinder, SourceFileLoader

    for _directory in (__path__[0], os.path.join(__path__[0], "protocol")):
        sys.path_importer_cache[_directory] = FileFinder(_directory, (SourceFileLoader, SOURCE_SUFFIXES))
