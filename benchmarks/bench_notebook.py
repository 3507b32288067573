"""Notebook-level cost of crucible, measured through a real Jupyter server and kernel.

    python benchmarks/bench_notebook.py [--cells 30] [--prints 40]

Starts ``jupyter server`` (with the crucible extension, SQLite in a temporary directory, the
local bubblewrap sandbox), opens a notebook through the sessions API as JupyterLab does, and
drives the server's kernel with nbclient:

1. a ``print(1)`` cell on the plain ipykernel beside the same cell under ``%%crucible``,
   interleaved in the same run: median wall time per cell (nbclient ``execute_cell``) and ratio;
2. time from a ``print`` inside the sandbox (the cell prints ``time.time()``) to the stream
   message arriving at the notebook client (p50/p95 over ``--prints`` prints; budget ≤ 50 ms),
   and, for reference, to a WebSocket subscriber of the crucible API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.asynchronous import AsyncKernelClient
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``jupyter server`` with the crucible extension in a temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "root"
        self.root.mkdir()
        self.runtime = tmp / "runtime"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "CRUCIBLE_DB_URL": f"sqlite:///{tmp}/bench.db",
               "JUPYTER_RUNTIME_DIR": str(self.runtime)}  # fmt: skip
        for key in ("CRUCIBLE_SERVER_URL", "CRUCIBLE_TOKEN", "JPY_SESSION_NAME"):
            env.pop(key, None)
        self.log = open(tmp / "server.log", "wb")  # noqa: SIM115 -- the server's lifetime; see stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", f"--ServerApp.port={self.port}",
             "--ServerApp.ip=127.0.0.1", "--ServerApp.open_browser=False",
             "--ServerApp.allow_root=True", f"--IdentityProvider.token={TOKEN}",
             f"--ServerApp.root_dir={self.root}",
             "--ServerApp.jpserver_extensions={'crucible_jupyter': True}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                self.call("GET", "crucible/api/health")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("jupyter server did not start; see server.log") from None
                time.sleep(0.2)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class ServerKernel:
    """nbclient's view of a kernel the server owns."""

    def __init__(self, server: Server, kernel_id: str) -> None:
        self.server, self.kernel_id = server, kernel_id

    async def is_alive(self) -> bool:
        try:
            self.server.call("GET", f"api/kernels/{self.kernel_id}")
            return True
        except OSError:
            return False


async def connect(server: Server, kernel_id: str) -> AsyncKernelClient:
    kc = AsyncKernelClient()
    kc.load_connection_file(str(server.runtime / f"kernel-{kernel_id}.json"))
    kc.start_channels()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kc.kernel_info()
        try:
            if (await kc.get_shell_msg(timeout=1))["msg_type"] == "kernel_info_reply":
                break
        except queue.Empty:
            continue
    while True:
        try:
            await kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            return kc


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def bench_cells(
    server: Server, kernel_id: str, n: int, engine: Any
) -> dict[str, list[float]]:
    plain = new_code_cell("print(1)")
    crucible = new_code_cell("%%crucible\nprint(1)")
    nb = new_notebook(cells=[new_code_cell("%load_ext crucible_jupyter"), plain, crucible])
    kc = await connect(server, kernel_id)
    client = NotebookClient(nb, timeout=120, kernel_name="python3")
    client.kc = kc
    client.km = ServerKernel(server, kernel_id)  # type: ignore[assignment]
    client.reset_execution_trackers()
    await client.async_execute_cell(nb.cells[0], 0)
    for warm in (1, 2):  # warm both paths (imports, first sandbox)
        await client.async_execute_cell(nb.cells[warm], warm)
    await engine_cell(engine)
    times: dict[str, list[float]] = {"plain": [], "crucible": [], "engine": []}
    for _ in range(n):  # interleaved, so all three see the same machine load
        for name, index in (("plain", 1), ("crucible", 2)):
            t0 = time.perf_counter()
            await client.async_execute_cell(nb.cells[index], index)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await engine_cell(engine)
        times["engine"].append(time.perf_counter() - t0)
        outputs = nb.cells[2].outputs
        assert outputs
        assert any(o.get("text") == "1\n" for o in outputs if o["output_type"] == "stream"), outputs
    kc.stop_channels()
    return times


PRINTER = (
    "%%crucible\nimport time\nfor i in range({n}):\n"
    "    print(repr(time.time()), flush=True)\n    time.sleep(0.05)\n"
)


async def bench_latency(server: Server, kernel_id: str, n: int) -> list[float]:
    kc = await connect(server, kernel_id)
    msg_id = kc.execute(PRINTER.format(n=n))
    lags = []
    while True:
        msg = await kc.get_iopub_msg(timeout=120)
        arrived = time.time()
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            for line in msg["content"]["text"].splitlines():
                with contextlib.suppress(ValueError):
                    lags.append(arrived - float(line))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    kc.stop_channels()
    return lags


async def bench_ws_latency(server: Server, n: int) -> list[float]:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    code = PRINTER.format(n=n).split("\n", 1)[1]
    execution = server.call("POST", "crucible/api/executions", {"code": code})
    url = f"ws://127.0.0.1:{server.port}/crucible/api/executions/{execution['id']}/stream"
    ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))
    lags = []
    while (message := await ws.read_message()) is not None:
        arrived = time.time()
        event = json.loads(message)
        if event["type"] == "stream":
            for line in event["text"].splitlines():
                lags.append(arrived - float(line))
    ws.close()
    return lags


async def start_engine(tmp: Path) -> Any:
    """An in-process dispatcher on its own database: the engine without any Jupyter part."""
    from traitlets.config import Config

    from crucible_jupyter.dispatcher import Dispatcher

    config = Config()
    config.CrucibleDispatcher.db_url = f"sqlite:///{tmp}/engine.db"
    dispatcher = Dispatcher(config=config)
    await dispatcher.start()
    return dispatcher


async def engine_cell(dispatcher: Any) -> None:
    """``print(1)`` submitted to the in-process dispatcher and followed to its terminal event."""
    execution = await dispatcher.submit({"code": "print(1)"})
    async for _ in dispatcher.subscribe(execution.id):
        pass


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    server = Server(tmp)
    try:
        (server.root / "bench.ipynb").write_text(nbformat.writes(new_notebook()))
        session = server.call(
            "POST", "api/sessions",
            {"path": "bench.ipynb", "type": "notebook", "name": "bench.ipynb",
             "kernel": {"name": "python3"}},
        )  # fmt: skip
        kernel_id = session["kernel"]["id"]
        engine_dispatcher = await start_engine(tmp)
        try:
            times = await bench_cells(server, kernel_id, args.cells, engine_dispatcher)
        finally:
            await engine_dispatcher.stop()
        lags = await bench_latency(server, kernel_id, args.prints)
        ws_lags = await bench_ws_latency(server, args.prints)
    finally:
        server.stop()
    engine = statistics.median(times["engine"]) * 1000

    plain = statistics.median(times["plain"]) * 1000
    crucible = statistics.median(times["crucible"]) * 1000
    rows = [
        ("print(1) cell, plain ipykernel (nbclient)", f"{plain:.1f} ms", f"n={args.cells}"),
        ("print(1) cell, %%crucible (nbclient)", f"{crucible:.1f} ms",
         f"{crucible / plain:.1f}x plain, +{crucible - plain:.0f} ms"),
        ("  of which the engine (in-process dispatcher)", f"{engine:.1f} ms",
         "submit -> terminal event, same cell, same machine"),
        ("  of which server + magic + kernel", f"{crucible - plain - engine:.1f} ms",
         "%%crucible - plain - engine"),
        ("print in sandbox -> notebook client, p50", f"{pct(lags, 50) * 1000:.1f} ms",
         f"p95 {pct(lags, 95) * 1000:.1f} ms, n={len(lags)}, budget 50 ms"),
        ("print in sandbox -> API WebSocket, p50", f"{pct(ws_lags, 50) * 1000:.1f} ms",
         f"p95 {pct(ws_lags, 95) * 1000:.1f} ms, n={len(ws_lags)}"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)}  {'median':>9}  notes")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 40}")
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>9}  {note}")
    if args.json:
        print(json.dumps({"plain_ms": plain, "crucible_ms": crucible, "engine_ms": engine,
                          "lag_p50_ms": pct(lags, 50) * 1000, "lag_p95_ms": pct(lags, 95) * 1000,
                          "ws_lag_p50_ms": pct(ws_lags, 50) * 1000}))  # fmt: skip


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=30, help="cells of each kind (default 30)")
    parser.add_argument("--prints", type=int, default=40, help="timed prints (default 40)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="crucible-bench-"))
    try:
        asyncio.run(main_async(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
