"""What users install is the fast build: a wheel built from this repo carries the compiled hot
path (the Dockerfile installs exactly such a wheel), and falls back to pure Python, with a
warning, only where no C compiler can build it.

Built from a copy of the package in a temporary directory, without build isolation (the test
environment has mypy and setuptools), so the repo's own in-place build is left alone. The
compiled wheel is built once, in the compiled pass of `make test` only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 400


def source_copy(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(ROOT / "pypooler", source / "pypooler", ignore=ignore)
    return source


def build_wheel(source: Path, out: Path, **env: str) -> tuple[Path, str]:
    """The wheel, and what the build printed (pip shows the backend's output with -v only)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", out, "."],
        cwd=source, env={**os.environ, **env}, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("pypooler-*.whl")
    return wheel, result.stdout + result.stderr


def import_from(directory: Path, code: str, **env: str) -> str:
    """Run `code` with pypooler imported from `directory` (not from the repo)."""
    clean = {k: v for k, v in os.environ.items() if k != "PYPOOLER_PURE"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=directory, env={**clean, "PYTHONPATH": str(directory), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(bool(os.environ.get("PYPOOLER_PURE")), reason="built once, in the compiled pass")
def test_the_wheel_is_the_compiled_build(tmp_path: Path) -> None:
    wheel, _ = build_wheel(source_copy(tmp_path), tmp_path / "dist")
    assert "linux" in wheel.name or "macosx" in wheel.name  # a platform wheel: it holds C code
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("pypooler/native__mypyc") for name in names)
    assert "pypooler/client.py" in names  # the sources too: PYPOOLER_PURE=1 runs them
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    check = "import pypooler.client, pypooler.protocol.codec as c; print(c.NATIVE, pypooler.client.__file__)"
    native, client_file = import_from(installed, check).split()
    assert native == "True" and client_file.endswith(".so") and client_file.startswith(str(installed))
    assert import_from(installed, check, PYPOOLER_PURE="1").split()[0] == "False"


def test_without_a_c_compiler_the_wheel_is_pure_python_with_a_warning(tmp_path: Path) -> None:
    # One small module keeps mypyc's part short; the compiler that fails is what matters.
    only = "pypooler/protocol/constants.py"
    source = source_copy(tmp_path)
    wheel, output = build_wheel(source, tmp_path / "dist", CC="false", PYPOOLER_MYPYC_MODULES=only)
    assert "building the pure-Python package instead of the compiled one" in output
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(name.endswith(".so") for name in names)
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    assert import_from(installed, "import pypooler.protocol.codec as c; print(c.NATIVE)") == "False"


def test_the_wheel_names_the_git_revision_it_was_built_from(tmp_path: Path) -> None:
    """pypooler_build_info's revision: from PYPOOLER_GIT_REVISION (the Dockerfile's build
    argument), else from the checkout's git; the sources keep "unknown"."""
    read = "from pypooler.revision import GIT_REVISION; print(GIT_REVISION)"
    source = source_copy(tmp_path)
    git = ["git", "-c", "user.name=pypooler", "-c", "user.email=pypooler@localhost"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "build"]):
        subprocess.run([*git, *command], cwd=source, check=True, capture_output=True, timeout=60)
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=source, check=True, capture_output=True, text=True
    ).stdout.strip()
    for given, expected in (("", head), ("0123456789ab", "0123456789ab")):
        out = tmp_path / f"dist-{expected}"
        wheel, _ = build_wheel(source, out, PYPOOLER_MYPYC="0", PYPOOLER_GIT_REVISION=given)
        installed = tmp_path / f"installed-{expected}"
        zipfile.ZipFile(wheel).extractall(installed)
        assert import_from(installed, read) == expected
    assert (source / "pypooler" / "revision.py").read_text() == (
        ROOT / "pypooler" / "revision.py"
    ).read_text()
    assert import_from(ROOT, read) == "unknown"
