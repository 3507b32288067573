"""Fixtures for the Jupyter-surface tests: a real Jupyter server with the ``crucible``
extension, the real dispatcher on the real local sandbox, SQLite in a temporary directory.

pytest-jupyter's fixtures are imported here (``pytest_plugins`` is only allowed in the root
conftest). Its collection hooks are left out so they do not fight pytest-asyncio: tests in this
directory are plain functions that drive the server's event loop through ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403

from tests.helpers.jupyter import ServerProcess

# pytest-jupyter's own hooks run coroutine tests on its loop; pytest-asyncio already does.
del pytest_pycollect_makeitem, pytest_pyfunc_call  # type: ignore[name-defined]  # noqa: F821

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def crucible_config() -> dict[str, Any]:
    """Extra traitlets config for a test (``{"CrucibleDispatcher": {...}}``); override it."""
    return {}


@pytest.fixture
def jp_server_config(tmp_path: Path, crucible_config: dict[str, Any]) -> Any:
    """The server config: the extension enabled, the dispatcher on SQLite in tmp."""
    config: dict[str, Any] = {
        "ServerApp": {"jpserver_extensions": {"crucible_jupyter": True}},
        "CrucibleDispatcher": {"db_url": f"sqlite:///{tmp_path}/crucible.db"},
    }
    for section, values in crucible_config.items():
        config.setdefault(section, {}).update(values)
    return Config(config)  # noqa: F405


@pytest.fixture
def run(jp_asyncio_loop: Any) -> Callable[[Any], Any]:
    """Run a coroutine to completion on the server's event loop."""
    return jp_asyncio_loop.run_until_complete


@pytest.fixture
def crucible_app(jp_serverapp: Any) -> Any:
    """The running ``CrucibleApp`` extension."""
    return jp_serverapp.extension_manager.extension_points["crucible"].app


@pytest.fixture
def api(jp_fetch: Any, jp_serverapp: Any, run: Callable) -> Iterator[Callable[..., Any]]:
    """``api(method, *path, body=None, params=None, headers=None)`` → (status, json or None)."""

    def call(method: str, *path: str, body: Any = None, raw: bytes | None = None, **kw: Any):
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        if raw is None and method in ("POST", "PUT", "PATCH"):
            raw = b""
        kw.setdefault("raise_error", False)
        response = run(
            jp_fetch(
                "crucible",
                "api",
                *path,
                method=method,
                body=raw,
                allow_nonstandard_methods=True,
                **kw,
            )
        )
        text = response.body.decode() if response.body else ""
        return response.code, (json.loads(text) if text else None), response

    call.sleep = lambda seconds: run(asyncio.sleep(seconds))  # type: ignore[attr-defined]
    yield call
    # leave nothing running behind: cancel what a test left, then wait for the ends
    dispatcher = jp_serverapp.extension_manager.extension_points["crucible"].app.dispatcher
    if dispatcher.busy:
        for status in ("queued", "starting", "running"):
            page, _ = run(dispatcher.list(status=status, limit=500))
            for execution in page:
                with contextlib.suppress(Exception):
                    run(dispatcher.cancel(execution.id))
        deadline = time.monotonic() + 15
        while dispatcher.busy and time.monotonic() < deadline:
            run(asyncio.sleep(0.05))


@pytest.fixture
def jupyter_server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``jupyter server`` subprocess with the extension, stopped at the end."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(REPO / "examples" / "crucible-demo.ipynb", root / "crucible-demo.ipynb")
    server = ServerProcess(root)
    try:
        yield server
    finally:
        server.stop()
