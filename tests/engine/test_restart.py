"""Nothing is lost or stuck when a dispatcher dies: reconciliation at start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from crucible_jupyter.dispatcher.recovery import RESTARTED
from crucible_jupyter.models import Execution, ExecutionRequest, Status, new_execution_id
from crucible_jupyter.storage import Storage
from tests.helpers.engine import stream_text


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _dead_owner() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{os.uname().nodename}:{proc.pid}"


async def test_restart_fails_running_and_adopts_queued(make_dispatcher, tmp_path, db_url):
    storage = Storage(db_url)
    storage.migrate()
    owner = _dead_owner()
    running = Execution(
        id=new_execution_id(),
        request=ExecutionRequest(code="print(1)"),
        status=Status.RUNNING,
        dispatcher_id=owner,
    )
    queued = Execution(
        id=new_execution_id(),
        request=ExecutionRequest(code="print('adopted')"),
        dispatcher_id=owner,
    )
    storage.create(running)
    storage.create(queued)
    storage.close()

    d = await make_dispatcher(db_url=db_url)
    failed = await d.get(running.id)
    assert failed.status is Status.FAILED
    assert failed.reason == RESTARTED
    adopted = await d.wait(queued.id)
    assert adopted.status is Status.SUCCEEDED
    assert stream_text(await d.events(queued.id)) == "adopted\n"
    stuck, _ = await d.list(status=["queued", "starting", "running"])
    assert stuck == []


async def test_live_owner_is_left_alone(make_dispatcher, tmp_path):
    url = f"sqlite:///{tmp_path}/crucible.db"
    storage = Storage(url)
    storage.migrate()
    other = Execution(
        id=new_execution_id(),
        request=ExecutionRequest(code="print(1)"),
        status=Status.RUNNING,
        dispatcher_id=f"{os.uname().nodename}:1",
    )
    storage.create(other)
    storage.close()
    d = await make_dispatcher(db_url=url)
    assert (await d.get(other.id)).status is Status.RUNNING


def test_sigkilled_cli_leaves_nothing_running(tmp_path):
    """`crucible run` killed with SIGKILL mid-cell: the next dispatcher fails it with a reason."""
    url = f"sqlite:///{tmp_path}/crucible.db"
    cell = tmp_path / "cell.py"
    cell.write_text("import time\nprint('working', flush=True)\ntime.sleep(100)\n")
    marker = f"MARK{os.getpid()}x{time.time_ns()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crucible_jupyter.cli",
            "--db-url",
            url,
            "run",
            "--env",
            f"MARK={marker}",
            str(cell),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    with proc:
        assert proc.stdout.readline() == "working\n"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], "the sandbox outlived its dispatcher"
    out = subprocess.run(
        [sys.executable, "-m", "crucible_jupyter.cli", "--db-url", url, "run", "-"],
        input="print('next')",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout == "next\n"
    hist = subprocess.run(
        [sys.executable, "-m", "crucible_jupyter.cli", "--db-url", url, "history", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    import json

    records = json.loads(hist.stdout)["executions"]
    assert sorted(r["status"] for r in records) == ["failed", "succeeded"]
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["reason"] == RESTARTED
    assert textwrap.dedent(failed["code"]).startswith("import time")


async def test_stop_fails_running_cells_with_a_reason_and_keeps_queued(make_dispatcher, tmp_path):
    url = f"sqlite:///{tmp_path}/stop.db"
    d = await make_dispatcher(db_url=url, max_concurrency=1)
    running = await d.submit({"code": "import time\nprint('x', flush=True)\ntime.sleep(100)"})
    queued = await d.submit({"code": "print('later')"})
    async for event in d.subscribe(running.id):
        if event.type == "stream":
            break
    await d.stop()
    storage = Storage(url)
    try:
        stopped = storage.get(running.id)
        assert stopped.status is Status.FAILED
        assert stopped.reason == "dispatcher stopped while the cell was running"
        stored = storage.events(running.id)
        assert stored[-1].data.get("status") == "failed", [(e.seq, e.type, e.data) for e in stored]
        assert storage.get(queued.id).status is Status.QUEUED  # adopted by the next start
    finally:
        storage.close()
    d2 = await make_dispatcher(db_url=url)
    assert (await d2.wait(queued.id)).status is Status.SUCCEEDED
