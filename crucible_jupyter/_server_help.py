"""Put crucible's settings into ``jupyter server --help-all`` and ``--generate-config``.

jupyter_server prints its help (and writes a generated config) from ``ServerApp.classes``, a
static list read while parsing the command line, before any server extension is found. No
extension can appear there through the extension API, so this module does the one thing that
works: when a process asks for help or a generated config and imports
``jupyter_server.serverapp``, the crucible classes (``CrucibleApp``, ``CrucibleDispatcher`` and
every installed backend) are appended to ``ServerApp.classes`` right after that module loads.

It is wired through ``crucible_jupyter_help.pth`` (installed beside the package), whose single
line imports this module only when ``--help-all`` or ``--generate-config`` is on the command
line; every other Python process pays one membership test and nothing else. It promises never to
break the process it runs in: any failure leaves jupyter_server's help as it was.

The classes are added when a server parses its command line, not while
``jupyter_server.serverapp`` loads: the crucible classes include ``CrucibleApp``, whose module
imports ``jupyter_server.serverapp`` itself, so importing it from inside that load was an
import circle (``crucible serve --help-all`` and ``jupyter crucible --help-all`` said
"cannot import name 'crucible_classes' from partially initialized module"). While the module
loads, this hook only wraps ``ServerApp.parse_command_line``; it imports nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any

TARGET = "jupyter_server.serverapp"
TRIGGERS = ("--help-all", "--generate-config")


def wanted(argv: list[str]) -> bool:
    """True when ``argv`` asks for the full help or a generated config file."""
    return any(arg in TRIGGERS for arg in argv[1:])


def crucible_classes() -> list[type]:
    """The configurable classes crucible adds (the server app decides which:
    :func:`crucible_jupyter.server.app.crucible_classes`)."""
    from .server.app import crucible_classes

    return crucible_classes()


def extend(server_app: Any) -> None:
    """Append the crucible classes to ``server_app.classes`` (a ``ServerApp`` or its class;
    idempotent)."""
    try:
        extra = [c for c in crucible_classes() if c not in server_app.classes]
    except Exception as e:  # noqa: BLE001 -- never break `jupyter server --help-all` itself
        print(f"crucible_jupyter: settings not listed here ({e})", file=sys.stderr)
        return
    server_app.classes = [*server_app.classes, *extra]


def extend_when_parsing(server_app: Any) -> None:
    """Make every instance of ``server_app`` (the ``ServerApp`` class) call :func:`extend` on
    itself first thing in ``parse_command_line``, where it starts reading its classes for help
    or a config file (idempotent). By then every module, ``CrucibleApp``'s included, has
    finished loading. (The instance, not the class: a traitlets ``Application`` copies
    ``classes`` when it is created.)"""
    parse = server_app.parse_command_line
    if getattr(parse, "_crucible_extends", False):
        return

    @functools.wraps(parse)
    def parse_command_line(self: Any, *args: Any, **kwargs: Any) -> Any:
        extend(self)
        return parse(self, *args, **kwargs)

    parse_command_line._crucible_extends = True  # type: ignore[attr-defined]
    server_app.parse_command_line = parse_command_line


class _AfterServerAppLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``jupyter_server.serverapp`` so that
    :func:`extend_when_parsing` runs once the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            extend_when_parsing(module.ServerApp)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install(argv: list[str] | None = None) -> None:
    """Arrange for :func:`extend` to run when a ``ServerApp`` parses its command line, if
    ``argv`` (default ``sys.argv``) asks for help or a generated config. Called from the
    ``.pth`` file."""
    if not wanted(sys.argv if argv is None else argv):
        return
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        extend_when_parsing(loaded.ServerApp)
    elif not any(isinstance(f, _AfterServerAppLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterServerAppLoads())
