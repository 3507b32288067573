"""The ``%%crucible`` magic in a real notebook: a ``jupyter server`` subprocess with the
extension opens the notebook (POST /api/sessions, as JupyterLab does), so the kernel is the
server's own and gets the crucible URL and credential from it; nbclient executes the cells
and the saved notebook is checked. Also: live streaming and interrupt → cancelled."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.helpers.jupyter import (
    ServerKernelManager,
    ServerProcess,
    collect,
    connect,
    server_request,
    start_session,
)


def _embedded_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a plain-IPython process: no Jupyter server handed to it (the magic
    embeds a dispatcher), its records in a SQLite file under ``tmp_path``."""
    env = {**os.environ, "CRUCIBLE_DB_URL": f"sqlite:///{tmp_path}/c.db"}
    for key in ("CRUCIBLE_SERVER_URL", "CRUCIBLE_TOKEN"):
        env.pop(key, None)
    return env


def _history(env: dict[str, str]) -> list[dict[str, Any]]:
    """The records in ``env``'s database, newest first (``crucible history --json``)."""
    done = subprocess.run(
        [sys.executable, "-c", "from crucible_jupyter.cli import main; main()", "history", "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    return json.loads(done.stdout)["executions"]


pytestmark = pytest.mark.slow


def outputs_of(nb: Any, cell_id: str) -> list[dict[str, Any]]:
    return next(c for c in nb.cells if c.id == cell_id).outputs


def stream(outputs: list[dict[str, Any]], name: str) -> str:
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == name)


def status_lines(outputs: list[dict[str, Any]]) -> list[str]:
    return [
        o["data"]["text/plain"]
        for o in outputs
        if o["output_type"] == "display_data" and "crucible ·" in o["data"].get("text/plain", "")
    ]


def test_demo_notebook_through_a_real_server(jupyter_server_process: ServerProcess, tmp_path: Path):
    server = jupyter_server_process
    session = start_session(server, "crucible-demo.ipynb")
    kernel_id = session["kernel"]["id"]
    nb = nbformat.read(server.root / "crucible-demo.ipynb", as_version=4)
    error_cell = nb.cells[-1]

    async def execute() -> None:
        kc = await connect(server, kernel_id)
        client = NotebookClient(nb, timeout=120, kernel_name="python3")
        client.kc = kc
        client.km = ServerKernelManager(server, kernel_id)  # type: ignore[assignment]
        client.reset_execution_trackers()
        try:
            for index, cell in enumerate(nb.cells):
                kc.cell_id = cell.id
                if cell is error_cell:
                    with pytest.raises(CellExecutionError) as e:
                        await client.async_execute_cell(cell, index)
                    assert e.value.ename == "RemoteExecutionError"
                    assert "invalid literal" in str(e.value)
                else:
                    await client.async_execute_cell(cell, index)
        finally:
            kc.stop_channels()

    asyncio.run(execute())
    saved = tmp_path / "executed.ipynb"
    nbformat.write(nb, saved)
    nb = nbformat.read(saved, as_version=4)

    # streaming: every line, in order, and a final status line with the execution id
    out = outputs_of(nb, "crucible-demo-03")
    assert stream(out, "stdout") == "".join(f"step {i}\n" for i in range(5)) + "done\n"
    [line] = status_lines(out)
    assert "✔ succeeded in" in line
    streaming_id = line.rsplit(" · ", 1)[-1]

    out = outputs_of(nb, "crucible-demo-04")
    assert stream(out, "stdout") == "this goes to stdout\n"
    assert stream(out, "stderr") == "and this to stderr\n"

    out = outputs_of(nb, "crucible-demo-06")
    pngs = [o for o in out if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(pngs) == 1
    results = [o for o in out if o["output_type"] == "execute_result"]
    assert results
    assert results[0]["data"]["text/plain"] == "42"

    out = outputs_of(nb, "crucible-demo-08")
    assert "a fresh process" in stream(out, "stdout")

    out = outputs_of(nb, "crucible-demo-09")
    history = [o for o in out if o["output_type"] == "execute_result"]
    assert streaming_id in history[0]["data"]["text/plain"]

    out = outputs_of(nb, "crucible-demo-11")
    [error] = [o for o in out if o["output_type"] == "error"]
    assert error["ename"] == "RemoteExecutionError"
    assert "ValueError" in error["evalue"]
    tb = "\n".join(error["traceback"])
    assert "invalid literal for int()" in tb
    assert "parse" in tb
    assert "✘ failed" in status_lines(out)[0]

    # the records say who ran what, from which notebook, cell and kernel
    record = server.api("GET", f"executions/{streaming_id}")
    assert record["status"] == "succeeded"
    assert record["user"] == getpass.getuser()
    assert record["tags"] == ["demo"]
    assert record["name"] == "streaming"
    assert record["notebook"] == {
        "path": "crucible-demo.ipynb",
        "cell_id": "crucible-demo-03",
        "kernel_id": kernel_id,
    }
    page = server.api("GET", "executions?tag=demo&limit=50")["executions"]
    assert {e["status"] for e in page} == {"succeeded", "failed"}
    assert {e["notebook"]["cell_id"] for e in page} == {
        f"crucible-demo-{i:02d}" for i in (3, 4, 6, 8, 11)
    }


def test_output_is_live_and_interrupt_cancels(jupyter_server_process: ServerProcess):
    server = jupyter_server_process
    session = start_session(server, "crucible-demo.ipynb")
    kernel_id = session["kernel"]["id"]

    async def scenario() -> None:
        kc = await connect(server, kernel_id)
        try:
            await _run(kc, "%load_ext crucible_jupyter")

            # live: each line reaches the client while the cell still runs
            code = "%%crucible\nimport time\nfor i in range(4):\n    print(i, flush=True)\n    time.sleep(0.4)\n"
            msgs = await collect(kc, kc.execute(code))
            streams = [m for m in msgs if m["msg_type"] == "stream"]
            assert "".join(m["content"]["text"] for m in streams) == "0\n1\n2\n3\n"
            first = next(m["arrived"] for m in streams if m["content"]["text"].startswith("0"))
            assert streams[-1]["arrived"] - first > 1.0  # not delivered in one batch at the end

            # interrupt: the kernel cancels the remote execution, the cell fails
            code = "%%crucible\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"
            interrupted: list[float] = []

            async def interrupt_once(msg: dict[str, Any]) -> None:
                stream = msg["msg_type"] == "stream"
                if stream and "sleeping" in msg["content"]["text"] and not interrupted:
                    interrupted.append(time.time())
                    assert (
                        server_request(server, "POST", f"api/kernels/{kernel_id}/interrupt") == 204
                    )

            msg_id = kc.execute(code)
            msgs = await collect(kc, msg_id, interrupt_once)
            assert interrupted
            reply = await kc.get_shell_msg(timeout=30)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = await kc.get_shell_msg(timeout=30)
            assert reply["content"]["status"] == "error"
            assert reply["content"]["ename"] == "KeyboardInterrupt"
            assert time.time() - interrupted[0] < 20
            lines = [
                m["content"]["data"]["text/plain"]
                for m in msgs
                if m["msg_type"] in ("display_data", "update_display_data")
            ]
            assert "cancelled" in lines[-1]
            execution_id = lines[-1].rsplit(" · ", 1)[-1]
        finally:
            kc.stop_channels()
        record = server.api("GET", f"executions/{execution_id}")
        assert record["status"] == "cancelled", record
        assert record["reason"] == "cancelled by request"

    asyncio.run(scenario())


async def _run(kc: AsyncKernelClient, code: str) -> dict[str, Any]:
    msg_id = kc.execute(code)
    await collect(kc, msg_id)
    reply = await kc.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "ok", reply["content"]
    return reply


def test_plain_ipython_uses_an_embedded_dispatcher(tmp_path: Path):
    """Outside Jupyter, the magic starts its own dispatcher (here: SQLite in tmp); its options
    reach the record; ``%crucible history`` and ``%crucible status`` read the records."""
    script = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext crucible_jupyter')\n"
        "ok = shell.run_cell('%%crucible --timeout 5 --priority high --cpu 500m --memory 256Mi"
        " --tag plain --tag two --name first\\nprint(\\'from the sandbox\\')')\n"
        "bad = shell.run_cell('%%crucible --tag plain\\n1/0')\n"
        "refused = shell.run_cell('%%crucible --memory lots\\n1')\n"
        "print('RESULTS', ok.success, bad.success, refused.success)\n"
        "print('ERROR', type(bad.error_in_exec).__name__, bad.error_in_exec.status)\n"
        "shell.run_cell('%crucible history -n 5')\n"
        "shell.run_cell('%crucible status ' + bad.error_in_exec.execution_id)\n"
    )
    env = _embedded_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "from the sandbox" in done.stdout
    assert "succeeded in" in done.stdout
    assert "ZeroDivisionError" in out
    assert (
        "UsageError: crucible: memory must be a size" in out
    )  # refused before anything ran, as a UsageError
    assert "RESULTS True False False" in done.stdout
    assert "ERROR RemoteExecutionError failed" in done.stdout
    assert "first" in done.stdout  # the history table
    assert ": failed (ZeroDivisionError: division by zero)" in done.stdout  # %crucible status
    records = _history(env)
    first = next(r for r in records if r.get("name") == "first")
    assert first["tags"] == ["plain", "two"]
    assert first["priority"] == "high"
    assert first["timeout"] == 5
    assert first["resources"] == {"cpu": 0.5, "memory": 256 << 20}
    assert first["user"]


def test_status_line_shows_the_queue_position(tmp_path: Path):
    """With one execution slot taken, a %%crucible cell says it is queued, and at which position."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "q.ipynb").write_text(nbformat.writes(nbformat.v4.new_notebook()))
    server = ServerProcess(root, extra_args=["--CrucibleDispatcher.max_concurrency=1"])
    try:
        blocker = server.api("POST", "executions", {"code": "import time\ntime.sleep(60)"})
        kernel_id = start_session(server, "q.ipynb")["kernel"]["id"]

        async def scenario() -> list[str]:
            kc = await connect(server, kernel_id)
            try:
                await _run(kc, "%load_ext crucible_jupyter")
                msg_id = kc.execute("%%crucible\nprint('my turn')")
                cancelled: list[bool] = []

                async def free_the_slot(msg: dict[str, Any]) -> None:
                    text = msg["content"].get("data", {}).get("text/plain", "")
                    if "queued at position 1" in text and not cancelled:
                        cancelled.append(True)
                        server.api("POST", f"executions/{blocker['id']}/cancel", {})

                msgs = await collect(kc, msg_id, free_the_slot)
                return [
                    m["content"]["data"]["text/plain"]
                    for m in msgs
                    if m["msg_type"] in ("display_data", "update_display_data")
                ] + [m["content"].get("text", "") for m in msgs if m["msg_type"] == "stream"]
            finally:
                kc.stop_channels()

        shown = asyncio.run(scenario())
    finally:
        server.stop()
    assert any("queued at position 1" in line for line in shown), shown
    assert any("succeeded" in line for line in shown), shown
    assert "my turn\n" in shown


def test_plain_ipython_misuse_is_one_clear_error(tmp_path: Path):
    """Each misuse of %%crucible / %crucible in plain IPython shows one UsageError line (what
    is wrong, how to write it), no traceback from crucible's code, and leaves nothing queued
    or running. An interrupt shows one line and the execution is recorded cancelled."""
    cells = [
        '%%crucible --name "unterminated\nprint(1)',
        "%%crucible --bogus 1\nprint(1)",
        "%%crucible --timeout abc\nprint(1)",
        "%%crucible --timeout -1\nprint(1)",
        "%%crucible --timeout 5 --timeout 6\nprint(1)",
        "%%crucible --memory 12XB\nprint(1)",
        "%%crucible --cpu 0\nprint(1)",
        "%%crucible --priority urgent\nprint(1)",
        "%%crucible --backend nosuch\nprint(1)",
        "%%crucible --tag 'a b'\nprint(1)",
        "%%crucible --timeout 5\n   \n",
        "%crucible frobnicate",
        "%crucible status no-such-id",
        "%crucible history -n abc",
        "%crucible history --status weird",
        "%crucible queue now",
    ]
    script = (
        "import json, os, signal, sys, threading\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext crucible_jupyter')\n"
        f"for cell in {cells!r}:\n"
        "    print('=== CELL', flush=True)\n"
        "    r = shell.run_cell(cell)\n"
        "    print('=== SUCCESS', r.success, flush=True)\n"
        "print('=== CELL', flush=True)\n"
        'shell.run_cell(\'%%crucible --name "my run"\\nprint("no newline", end="")\')\n'
        "print('=== CELL', flush=True)\n"
        "t = threading.Timer(3, lambda: os.kill(os.getpid(), signal.SIGINT))\n"
        "t.start()\n"
        "r = shell.run_cell('%%crucible --name slow\\nimport time\\ntime.sleep(60)')\n"
        "print('=== INTERRUPTED', type(r.error_in_exec).__name__, flush=True)\n"
    )
    env = _embedded_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    # no stack through crucible's code (IPython's long form starts with a dashed rule)
    assert "crucible_jupyter/" not in out, out
    assert "----------" not in out, out
    chunks = done.stdout.split("=== CELL\n")[1:]
    assert len(chunks) == len(cells) + 2, done.stdout
    for cell, chunk in zip(cells, chunks, strict=False):
        assert "=== SUCCESS False" in chunk, (cell, chunk)
    errors = [line for line in done.stderr.splitlines() if line.startswith("UsageError")]
    assert len(errors) == len(cells), done.stderr  # one error line per misuse
    assert "no closing quotation" in errors[0]
    assert "unrecognized arguments: --bogus" in errors[1]
    assert "--timeout SECONDS" in errors[1]
    assert "given more than once" in errors[4]
    assert "unknown unit 'XB'" in errors[5]
    assert "tag 'a b' is invalid" in errors[9]  # quotes grouped the value, then removed
    assert "no code to run" in errors[10]
    assert (
        "no execution with id 'no-such-id'; list recent ids with %crucible history" in (errors[12])
    )
    assert "invalid int value: 'abc'" in errors[13]
    # a value with spaces, quoted; the status line starts on a line of its own
    assert "no newline\ncrucible · ✔ succeeded" in chunks[-2]
    # an interrupt: one line saying what became of the execution
    assert "=== INTERRUPTED KeyboardInterrupt" in done.stdout
    [line] = [x for x in out.splitlines() if x.startswith("KeyboardInterrupt")]
    assert line.startswith("KeyboardInterrupt: crucible execution ")
    assert "cancelled" in line

    records = _history(env)
    by_name = {r.get("name"): r for r in records}
    assert set(by_name) == {"my run", "slow"}, records  # no misuse was submitted
    assert by_name["my run"]["status"] == "succeeded"
    assert by_name["slow"]["status"] == "cancelled"


def test_plain_ipython_exits_cleanly_after_an_interrupted_cell(tmp_path: Path):
    """Interrupt a running cell, then exit: the embedded dispatcher and its sandboxes (also
    the warm ones) are released while the client loop still runs; nothing complains at exit."""
    script = (
        "import os, signal, threading\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext crucible_jupyter')\n"
        "shell.run_cell('%%crucible\\nprint(1)')\n"  # the dispatcher and its warm sandboxes
        "threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "r = shell.run_cell('%%crucible\\nimport time\\nprint(\\'go\\', flush=True)\\n"
        "time.sleep(60)')\n"
        "print('INTERRUPTED', type(r.error_in_exec).__name__)\n"
    )
    env = _embedded_env(tmp_path)
    for _ in range(3):  # the leak this guards against showed about one run in three
        done = subprocess.run(
            [sys.executable, "-X", "dev", "-c", script],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert "INTERRUPTED KeyboardInterrupt" in done.stdout, out
        assert "unclosed" not in out, out
        assert "Event loop is closed" not in out, out
    records = _history(env)
    statuses = [r["status"] for r in records]
    assert sorted(statuses) == ["cancelled"] * 3 + ["succeeded"] * 3


def test_plain_ipython_interrupted_twice_shows_one_line(tmp_path: Path):
    """A second interrupt while the first one's cancel is under way (the cell ignores the
    first) stops the waiting: one KeyboardInterrupt line, no traceback through crucible's
    code, and the execution still ends cancelled."""
    script = (
        "import os, signal, sys, threading, time\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "shell.run_cell('%load_ext crucible_jupyter')\n"
        "running = threading.Event()\n"
        "class Watch:\n"  # the cell's 'go' reaching this process: it runs now
        "    def __init__(self, inner):\n"
        "        self.inner = inner\n"
        "    def write(self, text):\n"
        "        if 'go\\n' in text:\n"
        "            running.set()\n"
        "        return self.inner.write(text)\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.inner, name)\n"
        "sys.stdout = Watch(sys.stdout)\n"
        "def interrupt_twice():\n"
        "    running.wait(90)\n"
        "    time.sleep(0.3)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "threading.Thread(target=interrupt_twice, daemon=True).start()\n"
        "r = shell.run_cell('%%crucible --name stubborn\\nimport time\\n"
        "print(\\'go\\', flush=True)\\nwhile True:\\n    try:\\n        time.sleep(10)\\n"
        "    except KeyboardInterrupt:\\n        pass\\n')\n"
        "print('=== INTERRUPTED', type(r.error_in_exec).__name__, flush=True)\n"
        "time.sleep(5)\n"  # the cancel completes (interrupt, grace, kill) before the exit
    )
    env = _embedded_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert "=== INTERRUPTED KeyboardInterrupt" in done.stdout, out
    assert "crucible_jupyter/" not in out, out
    assert "Traceback" not in out, out
    [line] = [x for x in out.splitlines() if x.startswith("KeyboardInterrupt")]
    assert line.startswith("KeyboardInterrupt: crucible execution ")
    assert "cancelled" in line
    [record] = _history(env)
    assert record["name"] == "stubborn"
    assert record["status"] == "cancelled"
