"""A Jupyter server with the crucible extension: its API from a test, authorizers, and a real
``jupyter server`` subprocess for nbclient and the benchmark."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_server.auth import Authorizer

from crucible_jupyter.server.base import KERNEL_TOKEN_HEADER
from tests.helpers.net import free_port

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


LONG = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"  # a cell that runs on


def submit(api: Any, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """POST executions through the ``api`` fixture; the new execution (201 asserted)."""
    code, execution, _ = api("POST", "executions", body=body, **kw)
    assert code == 201, execution
    return execution


def wait_status(api: Any, execution_id: str, want: str, timeout: float = 30) -> dict[str, Any]:
    """Poll GET executions/{id} until its status is ``want``; the execution."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, body, _ = api("GET", "executions", execution_id)
        if body["status"] == want:
            return body
        api.sleep(0.05)
    raise AssertionError(f"{execution_id} never reached {want}: {body.get('status')}")


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
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed by stop()
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


class CellIdKernelClient(AsyncKernelClient):
    """Sends ``cellId`` in the execute_request metadata, as JupyterLab does."""

    cell_id: str | None = None

    def execute(  # type: ignore[override]
        self,
        code: str,
        silent: bool = False,
        store_history: bool = True,
        user_expressions: dict | None = None,
        allow_stdin: bool | None = None,
        stop_on_error: bool = True,
    ) -> str:
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history,
            "user_expressions": user_expressions or {},
            "allow_stdin": False,
            "stop_on_error": stop_on_error,
        }
        metadata = {"cellId": self.cell_id} if self.cell_id else {}
        msg = self.session.msg("execute_request", content, metadata=metadata)
        self.shell_channel.send(msg)
        return msg["header"]["msg_id"]


async def connect(server: ServerProcess, kernel_id: str) -> CellIdKernelClient:
    """A client of a kernel the server started, from the server's connection file."""
    kc = CellIdKernelClient()
    kc.load_connection_file(str(server.runtime_dir / f"kernel-{kernel_id}.json"))
    kc.start_channels()
    # like kc.wait_for_ready, without trusting the heartbeat of a kernel that just started
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kc.kernel_info()
        try:
            reply = await kc.get_shell_msg(timeout=1)
        except queue.Empty:
            continue
        if reply["msg_type"] == "kernel_info_reply":
            break
    else:
        raise AssertionError("the kernel never answered kernel_info")
    while True:  # drop the startup chatter on IOPub
        try:
            await kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            return kc


async def collect(kc: AsyncKernelClient, msg_id: str, stop: Any = None) -> list[dict[str, Any]]:
    """IOPub messages of ``msg_id`` until idle, stamped with their arrival time."""
    got = []
    while True:
        msg = await kc.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msg["arrived"] = time.time()
        got.append(msg)
        if stop is not None:
            await stop(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return got
