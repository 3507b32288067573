"""A dispatcher on the Kubernetes backend SIGKILLed with cells queued, starting (no Job yet)
and running: after the restart the cell that never began runs, the running ones end with
their real outcome and whole output (one of them ended while no dispatcher ran), the one
whose Job went away ends with a reason, and nothing stays unfinished."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time

from crucible_jupyter.backends.kubernetes import objects
from crucible_jupyter.dispatcher.recovery import RESTARTED
from crucible_jupyter.models import Status
from crucible_jupyter.storage import Storage
from tests.helpers.k8s import dispatcher_env, kubectl

#: A dispatcher process whose cluster connection stalls the creation of the Job of a cell
#: marked "stall": it models an API server slow to accept a Job, so that the kill finds a cell
#: that left the queue (``starting``) and of which no Job exists.
DISPATCHER = """
import asyncio, base64, json, sys
from traitlets.config import Config
from crucible_jupyter.dispatcher import Dispatcher

CELLS = json.loads(sys.argv[2])

async def main():
    c = Config()
    c.CrucibleDispatcher.db_url = sys.argv[1]
    c.CrucibleDispatcher.backend = "kubernetes"
    c.CrucibleDispatcher.max_concurrency = 4
    d = Dispatcher(config=c)
    await d.start()
    cluster = d.get_backend("kubernetes").cluster
    create_job = cluster.create_job

    async def create_job_stalled(job, configmap):
        if base64.b64decode(configmap["binaryData"]["cell.py"]).startswith(b"# stall"):
            print("stalled", flush=True)
            await asyncio.sleep(3600)
        return await create_job(job, configmap)

    cluster.create_job = create_job_stalled
    ids = {}
    for name, code in CELLS.items():
        ids[name] = (await d.submit({"code": code, "memory": "64Mi"})).id
    print(json.dumps(ids), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""

CELLS = {  # in submission order: the first four take the 4 slots, the last two wait
    "long": "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.5)\n",
    "quick": "import time\nprint('quick began', flush=True)\ntime.sleep(3)\nprint('quick ended')",
    "gone": "import time\nprint('gone began', flush=True)\ntime.sleep(600)",
    "stall": "# stall\nprint('ran after the restart')",
    "queued1": "print('queued 1')",
    "queued2": "print('queued 2')",
}


def _readline(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The next line the dispatcher process prints (AssertionError after ``timeout`` s)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"the dispatcher process said nothing for {timeout:g} s")
    return proc.stdout.readline()


def _stream(events) -> str:
    return "".join(e.data["text"] for e in events if e.type == "stream")


def _wait_stored(url: str, execution_id: str, text: str) -> None:
    """Wait (bounded) until ``text`` is in the stored output of ``execution_id``."""
    storage = Storage(url)
    try:
        for _ in range(1200):
            if text in _stream(storage.events(execution_id)):
                return
            time.sleep(0.1)
    finally:
        storage.close()
    raise AssertionError(f"{text!r} was never stored for {execution_id}")


def _pod_phases(kube, namespace: str, execution_id: str) -> list[str]:
    selector = f"{objects.EXECUTION_LABEL}={objects.label_value(execution_id)}"
    pods = json.loads(kubectl(kube, "-n", namespace, "get", "pods", "-l", selector, "-o", "json"))
    return [p.get("status", {}).get("phase") for p in pods["items"]]


async def test_sigkill_with_cells_queued_starting_and_running(k8s, kube, namespace, tmp_path):
    url = f"sqlite:///{tmp_path}/killed.db"
    env = dispatcher_env(kube, namespace, tmp_path, warm_pods=0)
    with subprocess.Popen(
        [sys.executable, "-c", DISPATCHER, url, json.dumps(CELLS)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as proc:
        lines = [_readline(proc), _readline(proc)]
        assert "stalled\n" in lines, lines
        ids = json.loads(next(line for line in lines if line.startswith("{")))
        _wait_stored(url, ids["long"], "0\n")
        _wait_stored(url, ids["quick"], "quick began\n")
        _wait_stored(url, ids["gone"], "gone began\n")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    storage = Storage(url)
    left = {e.id: e.status for e in storage.unfinished()}
    storage.close()
    assert left[ids["stall"]] is Status.STARTING
    assert left[ids["queued1"]] is left[ids["queued2"]] is Status.QUEUED
    jobs = json.loads(kubectl(kube, "-n", namespace, "get", "jobs", "-o", "json"))["items"]
    names = {j["metadata"]["name"] for j in jobs}
    assert objects.job_name(ids["stall"]) not in names  # it never began
    assert objects.job_name(ids["gone"]) in names
    # while no dispatcher runs: one Job goes away, another cell ends
    kubectl(kube, "-n", namespace, "delete", "job", objects.job_name(ids["gone"]),
            "--cascade=foreground", "--wait=true")  # fmt: skip
    for _ in range(600):
        if _pod_phases(kube, namespace, ids["quick"]) == ["Succeeded"]:
            break
        await asyncio.sleep(0.1)
    assert _pod_phases(kube, namespace, ids["quick"]) == ["Succeeded"]

    d = await k8s(db_url=url)
    finals = {name: await d.wait(i) for name, i in ids.items()}
    reasons = {name: (f.status.value, f.reason) for name, f in finals.items()}
    outputs = {name: _stream(await d.events(i)) for name, i in ids.items()}
    # never began: it runs after the restart (it was failed "dispatcher restarted" before)
    assert finals["stall"].status is Status.SUCCEEDED, reasons
    assert outputs["stall"] == "ran after the restart\n"
    for name in ("queued1", "queued2"):
        assert finals[name].status is Status.SUCCEEDED, reasons
    assert (outputs["queued1"], outputs["queued2"]) == ("queued 1\n", "queued 2\n")
    # running: followed again to its end, its output whole
    assert finals["long"].status is Status.SUCCEEDED, reasons
    assert outputs["long"] == "".join(f"{i}\n" for i in range(8))
    # ended while no dispatcher ran: its real outcome and output, read from its pod
    assert finals["quick"].status is Status.SUCCEEDED, reasons
    assert outputs["quick"] == "quick began\nquick ended\n"
    # began, and its Job is gone: failed with the reason, what was stored is kept
    assert finals["gone"].status is Status.FAILED
    assert finals["gone"].reason == RESTARTED
    assert outputs["gone"] == "gone began\n"
    for i in ids.values():
        events = await d.events(i)
        assert [e.seq for e in events] == list(range(len(events)))
        assert events[-1].type == "status"
        assert Status(events[-1].data["status"]).terminal
    stuck, _ = await d.list(status=["queued", "starting", "running"])
    assert stuck == []


#: A dispatcher process with one warm pod whose pool stalls sending a cell marked "stall" to
#: the warm pod it claimed: it models a dispatcher that dies between the claim (the pod then
#: carries the execution's labels) and the cell reaching the pod.
CLAIMED_NOT_SENT = """
import asyncio, json, sys
from traitlets.config import Config
from crucible_jupyter.backends.kubernetes import warm
from crucible_jupyter.dispatcher import Dispatcher

send = warm.WarmPool._send

async def send_stalled(self, pod_name, execution):
    if execution.request.code.startswith("# stall"):
        print("stalled", flush=True)
        await asyncio.sleep(3600)
    return await send(self, pod_name, execution)

warm.WarmPool._send = send_stalled

async def main():
    c = Config()
    c.CrucibleDispatcher.db_url = sys.argv[1]
    c.CrucibleDispatcher.backend = "kubernetes"
    d = Dispatcher(config=c)
    await d.start()
    backend = d.get_backend("kubernetes")
    await backend.prepare()
    while not backend.warm_pool().warm_pods():
        await asyncio.sleep(0.2)
    execution = await d.submit({"code": "# stall\\nprint('ran after the restart')"})
    print(json.dumps({"id": execution.id}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_sigkill_between_a_warm_claim_and_its_cell(k8s, kube, namespace, tmp_path):
    """The claimed warm pod ends without the cell (its stdin closed with the dead dispatcher):
    the cell never began, so it runs after the restart (it failed "the sandbox ended without
    running the cell" before)."""
    url = f"sqlite:///{tmp_path}/claimed.db"
    env = dispatcher_env(kube, namespace, tmp_path, warm_pods=1)
    with subprocess.Popen(
        [sys.executable, "-c", CLAIMED_NOT_SENT, url],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as proc:
        lines = [_readline(proc), _readline(proc)]
        assert "stalled\n" in lines, lines
        execution_id = json.loads(next(line for line in lines if line.startswith("{")))["id"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = Storage(url)
    left = storage.get(execution_id)
    storage.close()
    assert left.status is Status.STARTING
    assert left.isolation is None  # no mark: it never began
    assert _pod_phases(kube, namespace, execution_id)  # the claimed warm pod carries its label

    d = await k8s(db_url=url)
    final = await d.wait(execution_id)
    assert final.status is Status.SUCCEEDED, final.reason
    assert final.isolation == "kubernetes"  # run again, on a Job of its own
    events = await d.events(execution_id)
    assert _stream(events) == "ran after the restart\n"
    assert [e.seq for e in events] == list(range(len(events)))
