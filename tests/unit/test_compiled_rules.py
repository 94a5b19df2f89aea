"""Rules for the modules mypyc compiles (setup.py's HOT_PATH) that mypy does not check.

mypyc enforces declared types at runtime where Python does not. One it is easy to trip on: all
`except ... as name` clauses of a function share one local variable, typed by the first clause,
so `except PoolerError as exc` followed by `except ScramProofMismatch as exc` raises TypeError
in the compiled build when the second one catches something (it did: issue 14).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compiled_modules() -> list[Path]:
    setup = (ROOT / "setup.py").read_text()
    hot_path = setup[setup.index("HOT_PATH = [") : setup.index("]", setup.index("HOT_PATH = ["))]
    modules = [ROOT / path for path in re.findall(r'"(pypooler/[\w/]+\.py)"', hot_path)]
    assert len(modules) > 5 and all(path.exists() for path in modules), modules
    return modules


def except_names_with_two_types(path: Path) -> list[str]:
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        bound: dict[str, set[str]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                bound.setdefault(node.name, set()).add(ast.unparse(node.type))
        found += [
            f"{path.relative_to(ROOT)}:{function.name}: {name} bound as {sorted(types)}"
            for name, types in bound.items()
            if len(types) > 1
        ]
    return found


def test_no_except_name_is_bound_to_two_exception_types_in_compiled_modules() -> None:
    problems = [problem for path in compiled_modules() for problem in except_names_with_two_types(path)]
    assert problems == []
