"""A dispatcher killed with cells queued, starting and running: after the restart a cell that
never began runs, one that began ends with a reason, nothing stays unfinished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from crucible_jupyter.dispatcher.recovery import RESTARTED
from crucible_jupyter.models import Execution, ExecutionRequest, Status, new_execution_id
from crucible_jupyter.storage import Storage

#: A dispatcher process whose local backend stalls the start of cells marked "stall": it
#: models a backend slow to create a sandbox (an API server slow to create a Job), so that
#: the kill finds a cell that left the queue and never began.
DISPATCHER = """
import asyncio, json, sys
from traitlets.config import Config
from crucible_jupyter.dispatcher import Dispatcher

async def main():
    c = Config()
    c.CrucibleDispatcher.db_url = sys.argv[1]
    c.CrucibleDispatcher.max_concurrency = 2
    d = Dispatcher(config=c)
    await d.start()
    backend = d.get_backend("local")
    start = backend.start

    async def start_stalled(execution):
        if "stall" in execution.request.code:
            print("stalled", flush=True)
            await asyncio.sleep(3600)
        return await start(execution)

    backend.start = start_stalled
    ids = {}
    ids["running"] = (await d.submit({"code": "import time\\nprint('began', flush=True)\\n"
                                               "time.sleep(100)"})).id
    ids["stalled"] = (await d.submit({"code": "# stall\\nprint('after the restart')"})).id
    ids["queued"] = (await d.submit({"code": "print('queued')"})).id
    print(json.dumps(ids), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _stream(events) -> str:
    return "".join(e.data["text"] for e in events if e.type == "stream")


def _wait_stored(url: str, execution_id: str, text: str) -> None:
    """Wait (bounded) until ``text`` is in the stored output of ``execution_id``."""
    storage = Storage(url)
    try:
        for _ in range(300):
            if text in _stream(storage.events(execution_id)):
                return
            time.sleep(0.05)
    finally:
        storage.close()
    raise AssertionError(f"{text!r} was never stored for {execution_id}")


async def test_sigkill_requeues_never_begun_and_fails_begun(make_dispatcher, tmp_path):
    url = f"sqlite:///{tmp_path}/killed.db"
    with subprocess.Popen(
        [sys.executable, "-c", DISPATCHER, url],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "stalled\n" in lines, lines
        ids = json.loads(next(line for line in lines if line.startswith("{")))
        _wait_stored(url, ids["running"], "began\n")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = Storage(url)
    left = {e.id: e.status for e in storage.unfinished()}
    storage.close()
    assert left == {
        ids["running"]: Status.RUNNING,
        ids["stalled"]: Status.STARTING,
        ids["queued"]: Status.QUEUED,
    }

    d = await make_dispatcher(db_url=url)
    stalled = await d.wait(ids["stalled"])
    assert stalled.status is Status.SUCCEEDED, stalled.reason  # never began: it ran now
    assert _stream(await d.events(ids["stalled"])) == "after the restart\n"
    queued = await d.wait(ids["queued"])
    assert queued.status is Status.SUCCEEDED, queued.reason
    began = await d.wait(ids["running"])
    assert began.status is Status.FAILED
    assert began.reason == RESTARTED  # a local sandbox dies with its dispatcher
    events = await d.events(ids["running"])
    assert _stream(events) == "began\n"  # what it printed before the kill is kept
    assert events[-1].type == "status"
    assert events[-1].data["status"] == "failed"
    for execution_id in ids.values():
        seqs = [e.seq for e in await d.events(execution_id)]
        assert seqs == list(range(len(seqs)))
    stuck, _ = await d.list(status=["queued", "starting", "running"])
    assert stuck == []


async def test_starting_with_the_marker_fails_and_without_it_runs(make_dispatcher, db_url):
    """Records as a dead dispatcher leaves them: ``starting`` with the mark of a created
    sandbox (``isolation``) began; without it, it never did."""
    storage = Storage(db_url)
    storage.migrate()
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = f"{os.uname().nodename}:{dead.pid}"
    created = Execution(
        id=new_execution_id(),
        request=ExecutionRequest(code="print(1)"),
        status=Status.STARTING,
        isolation="bubblewrap",
        dispatcher_id=owner,
    )
    never = Execution(
        id=new_execution_id(),
        request=ExecutionRequest(code="print('ran once')"),
        status=Status.STARTING,
        dispatcher_id=owner,
    )
    storage.create(created)
    storage.create(never)
    storage.close()
    d = await make_dispatcher(db_url=db_url)
    assert (await d.get(created.id)).reason == RESTARTED
    final = await d.wait(never.id)
    assert final.status is Status.SUCCEEDED, final.reason
    assert _stream(await d.events(never.id)) == "ran once\n"
    assert textwrap.dedent(final.request.code) == "print('ran once')"
