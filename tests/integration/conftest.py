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
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_server.auth import Authorizer
from pytest_jupyter.jupyter_server import *  # noqa: F403
from tornado.httpclient import HTTPClientError

from crucible_jupyter.server.base import KERNEL_TOKEN_HEADER

# pytest-jupyter's own hooks run coroutine tests on its loop; pytest-asyncio already does.
del pytest_pycollect_makeitem, pytest_pyfunc_call  # type: ignore[name-defined]  # noqa: F821

REPO = Path(__file__).resolve().parents[2]


class ReadOnlyAuthorizer(Authorizer):
    """Lets every user read anything but write nothing on resource ``crucible``."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        """``read`` only on ``crucible``; everything elsewhere."""
        return resource != "crucible" or action == "read"


class NoCrucibleAuthorizer(Authorizer):
    """Refuses every action on resource ``crucible``."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        """Nothing on ``crucible``."""
        return resource != "crucible"


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


def wait_terminal(api: Callable, execution_id: str, timeout: float = 60) -> dict[str, Any]:
    """Poll GET executions/{id} until the execution is finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body, _ = api("GET", "executions", execution_id)
        assert code == 200, body
        if body["status"] in ("succeeded", "failed", "timed_out", "cancelled"):
            return body
        api.sleep(0.05)  # the server runs on this loop: let it
    raise AssertionError(f"{execution_id} did not finish in {timeout} s")


def kernel_headers(crucible_app: Any) -> dict[str, str]:
    """Headers a kernel of this server uses (no Jupyter token, the kernel credential)."""
    return {KERNEL_TOKEN_HEADER: crucible_app.kernel_token, "Authorization": ""}


__all__ = ["HTTPClientError", "kernel_headers", "wait_terminal"]


# -- a real `jupyter server` subprocess, for nbclient and the benchmark ----------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``jupyter server`` subprocess with the crucible extension, on a free port."""

    def __init__(
        self,
        root: Path,
        *,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.root = root
        self.port = free_port()
        self.token = "crucible-test-token"
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, **(extra_env or {})}
        env.setdefault("CRUCIBLE_DB_URL", f"sqlite:///{root}/crucible.db")
        self.runtime_dir = root.parent / "runtime"
        env["JUPYTER_RUNTIME_DIR"] = str(self.runtime_dir)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        for key in ("CRUCIBLE_SERVER_URL", "CRUCIBLE_TOKEN", "JPY_SESSION_NAME"):
            env.pop(key, None)
        self.log_path = root / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "jupyter_server",
                f"--ServerApp.port={self.port}", "--ServerApp.ip=127.0.0.1",
                "--ServerApp.open_browser=False", f"--IdentityProvider.token={self.token}",
                "--ServerApp.allow_root=True",
                f"--ServerApp.root_dir={root}",
                "--ServerApp.jpserver_extensions={'crucible_jupyter': True}",
                *(extra_args or []),
            ],
            cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited:\n{self.log()}")
            try:
                req = urllib.request.Request(
                    self.url + "crucible/api/health",
                    headers={"Authorization": f"token {self.token}"},
                )
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"jupyter server did not become ready:\n{self.log()}")

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the crucible API with the server token; the decoded JSON."""
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + "crucible/api/" + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def log(self) -> str:
        """The server's output so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and close its log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


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


class ServerKernelManager:
    """What nbclient needs of a kernel manager, for a kernel the Jupyter server owns: it asks
    the server (GET /api/kernels/{id}) whether the kernel is alive."""

    def __init__(self, server: ServerProcess, kernel_id: str) -> None:
        self.server = server
        self.kernel_id = kernel_id

    async def is_alive(self) -> bool:
        """True while the server lists the kernel."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            f"{self.server.url}api/kernels/{self.kernel_id}",
            headers={"Authorization": f"token {self.server.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status == 200
        except urllib.error.URLError:
            return False


def start_session(server: ServerProcess, path: str, kernel: str = "python3") -> dict[str, Any]:
    """Open ``path`` the way JupyterLab does (POST /api/sessions): the server starts the kernel."""
    import urllib.request

    req = urllib.request.Request(
        f"{server.url}api/sessions",
        data=json.dumps(
            {"path": path, "type": "notebook", "name": path, "kernel": {"name": kernel}}
        ).encode(),
        method="POST",
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def server_request(server: ServerProcess, method: str, path: str) -> int:
    """A bodyless call to the Jupyter server's own API; the status code."""
    import urllib.request

    req = urllib.request.Request(
        f"{server.url}{path}",
        data=b"" if method == "POST" else None,
        method=method,
        headers={"Authorization": f"token {server.token}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status
