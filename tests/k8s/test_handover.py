"""``handover_on_stop``: a dispatcher stopped with a cell running on the Kubernetes backend
leaves its Job running and its record `running`; the next dispatcher of the database follows
the cell to its real end with its whole output (what the Helm chart's StatefulSet relies on
when its pod is deleted mid-cell). Without the setting the cell ends with the stop's reason."""

from __future__ import annotations

import asyncio

from crucible_jupyter.models import Status
from crucible_jupyter.storage import Storage

CELL = "import time\nprint('before', flush=True)\ntime.sleep(4)\nprint('after')"


def _text(events) -> str:
    return "".join(e.data["text"] for e in events if e.type == "stream")


async def _wait_for_output(d, execution_id: str, text: str) -> None:
    for _ in range(1200):
        if text in _text(await d.events(execution_id)):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} never came from {execution_id}")


async def test_a_stopped_dispatcher_hands_its_running_cell_over(k8s, tmp_path):
    url = f"sqlite:///{tmp_path}/handover.db"
    first = await k8s(db_url=url, dispatcher={"handover_on_stop": True})
    execution = await first.submit({"code": CELL, "memory": "64Mi"})
    await _wait_for_output(first, execution.id, "before\n")
    assert await first.drain(30) == 0  # nothing to wait for: it is handed over
    await first.stop("the crucible service shut down")
    with Storage(url) as storage:
        assert storage.get(execution.id).status is Status.RUNNING

    second = await k8s(db_url=url)
    final = await second.wait(execution.id)
    assert final.status is Status.SUCCEEDED, final.reason
    events = await second.events(execution.id)
    assert _text(events) == "before\nafter\n"
    seqs = [e.seq for e in events]
    assert seqs == list(range(len(seqs)))


async def test_without_handover_a_stop_ends_the_running_cell(k8s, tmp_path):
    url = f"sqlite:///{tmp_path}/no-handover.db"
    first = await k8s(db_url=url)
    execution = await first.submit({"code": CELL, "memory": "64Mi"})
    await _wait_for_output(first, execution.id, "before\n")
    await first.stop("the crucible service shut down")
    with Storage(url) as storage:
        record = storage.get(execution.id)
    assert record.status is Status.FAILED
    assert record.reason == "the crucible service shut down"
