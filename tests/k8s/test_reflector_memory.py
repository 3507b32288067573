"""The shared pod watch keeps nothing of finished executions (issue: it kept the last
state of every deleted pod, one entry per execution, for the dispatcher's lifetime).

Many cold cells run, several at once; once their pods are deleted, what the reflector
retains is the same after 60 cells as after 20: nothing of any of them.
"""

from __future__ import annotations

import asyncio

import pytest

from crucible_jupyter.backends.kubernetes import objects
from crucible_jupyter.models import Status

pytestmark = pytest.mark.k8s

#: Cells at once: each pod requests 0.1 CPU; the dev cluster's node has 2.
CONCURRENT = 10


async def run_cells(d, count: int) -> None:
    """Run ``count`` cells (``CONCURRENT`` at a time) and wait, bounded, until the pod
    watch has seen every one of their pods deleted."""
    backend = d.get_backend("kubernetes")
    request = {"code": "print('hi')", "cpu": 0.1, "memory": "128Mi"}
    submitted = [await d.submit(request) for _ in range(count)]
    finals = [await d.wait(e.id) for e in submitted]
    assert [f.status for f in finals] == [Status.SUCCEEDED] * count, [f.reason for f in finals]
    keys = {objects.label_value(e.id) for e in submitted}
    reflector = backend.cluster.pods
    for _ in range(600):  # a bound, not a timing assertion: the Jobs go in the background
        left = [p for p in reflector.pods.values() if reflector._key(p) in keys]
        if not left:
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"{len(left)} pods of finished executions were not deleted")


async def test_the_pod_watch_retains_nothing_of_finished_executions(k8s):
    d = await k8s(warm_pods=0, dispatcher={"max_concurrency": CONCURRENT})
    cluster = d.get_backend("kubernetes").cluster  # (connected by the first cell)
    await run_cells(d, 20)
    after_20 = cluster.pods.retained()
    await run_cells(d, 40)
    after_60 = cluster.pods.retained()
    print(f"retained after 20 cells: {after_20}; after 60: {after_60}")
    assert after_60 == after_20, (after_20, after_60)
    assert after_60 == {"pods": 0, "gone": 0, "held": 0, "waits": 0}, after_60
