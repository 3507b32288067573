"""The test suite's own rules, checked on its source: helpers are imported from tests.helpers,
never from a conftest.py or another test module, and conftest files hold fixtures and hooks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SOURCES = sorted(TESTS.rglob("*.py"))


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((node.lineno, base))
            # from . import conftest; from tests.k8s import conftest
            found += [(node.lineno, f"{base.rstrip('.')}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(TESTS)))
def test_nothing_is_imported_from_a_conftest_or_a_test_module(path: Path) -> None:
    wrong = [
        f"line {line}: {module}"
        for line, module in _imported_modules(ast.parse(path.read_text()))
        if module.rsplit(".", 1)[-1] == "conftest" or module.rsplit(".", 1)[-1].startswith("test_")
    ]
    assert not wrong, f"move what these import into tests/helpers/: {wrong}"


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if p.name == "conftest.py"],
    ids=lambda p: str(p.relative_to(TESTS)),
)
def test_conftest_files_hold_fixtures_and_hooks(path: Path) -> None:
    public = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            public.append(node.name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
            if not (fixture or node.name.startswith(("pytest_", "_"))):
                public.append(node.name)
    assert not public, f"helpers belong in tests/helpers/, not in {path.name}: {public}"


def test_the_layout_check_sees_every_spelling_of_a_conftest_import() -> None:
    source = "from .conftest import x\nfrom tests.k8s import conftest\nfrom . import test_a\n"
    modules = [m for _, m in _imported_modules(ast.parse(source + "import test_runner"))]
    assert modules == [
        ".conftest",
        ".conftest.x",
        "tests.k8s",
        "tests.k8s.conftest",
        ".",
        ".test_a",
        "test_runner",
    ]
