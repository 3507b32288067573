"""The package has no import circle, counting imports made inside functions too (a lazy
import that only dodges a circle is still one). TYPE_CHECKING imports are left out: they
never run. Circles the source cannot show, made by crucible's ``--help-all`` import hook,
are checked by importing the modules concerned with the hook armed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import crucible_jupyter

ROOT = Path(crucible_jupyter.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its code."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                subs = {f"{target}.{a.name}" for a in child.names} & modules.keys()
                found.update(subs)
                if target in modules and len(subs) < len(child.names):
                    found.add(target)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return circles


def test_the_package_has_no_import_circle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _circles(graph) == []


def test_the_checker_finds_a_circle():
    # it can fail: two modules importing each other (lazily) are one circle
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(graph) == [["a", "b", "c"]]


def _importing_jupyter_server(modules: dict[str, Path]) -> list[str]:
    """The package's modules with an import of ``jupyter_server`` (or one of its modules)."""
    found = []
    for name, path in sorted(modules.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] == "jupyter_server" for n in names):
                found.append(name)
                break
    return found


@pytest.mark.parametrize("module", _importing_jupyter_server(_modules()))
def test_no_circle_through_the_help_hook(module, tmp_path):
    """The graph above cannot see one circle: with ``--help-all`` or ``--generate-config`` on
    the command line, ``crucible_jupyter_help.pth`` arms an import hook so that loading
    ``jupyter_server.serverapp`` runs ``crucible_jupyter._server_help``. That edge is made by no
    import statement, and it leaves the package (module -> jupyter_server.serverapp -> hook),
    so the hook importing ``crucible_jupyter.server.app`` while that very module was importing
    jupyter_server went unseen ("cannot import name 'crucible_classes' from partially
    initialized module"). So: each module that imports jupyter_server, imported first thing
    in a fresh interpreter with the hook armed, loads without a word."""
    probe = f"import sys, {module}; print('crucible_jupyter._server_help' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe, "--help-all"],
        cwd=tmp_path,  # the installed package, as a user's process finds it
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True", "the help hook is not installed: pip install -e ."
    assert done.stderr == ""
