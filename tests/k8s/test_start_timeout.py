"""A cell whose pod cannot start within the cell's timeout (here: a quota it waits for,
``quota_policy="wait"``; on a full cluster: no node with room) times out saying it never
ran: it is never shown as ``running``, and its Job is deleted. Seen with bench_chart at
``executions.maxConcurrent`` 16 on a two-core node: 13 cells were recorded ``running`` and
then "timed out after 60 s" 20 ms later, without having run."""

from __future__ import annotations

import asyncio

from crucible_jupyter.dispatcher.outcome import not_started_reason
from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, statuses, stream_text
from tests.helpers.k8s import resource_quota, wait_until_job_deleted


async def test_a_cell_that_cannot_start_in_time_never_ran(k8s, kube, namespace):
    with resource_quota(kube, namespace, "no-room", {"limits.memory": "300Mi"}):
        d = await k8s(quota_policy="wait")
        execution, events = await run_cell(d, "print('ran')", memory="1Gi", timeout=4)
        assert execution.status is Status.TIMED_OUT, execution.reason
        assert execution.reason == not_started_reason(4)
        assert "running" not in statuses(events), statuses(events)
        assert not any(e.type == "stream" for e in events)
        await wait_until_job_deleted(kube, namespace, execution.id)


async def test_a_pod_that_waited_for_room_gets_its_whole_timeout_to_run(k8s, kube, namespace):
    """The Job's deadline counts from its creation, the wait included: a cell whose pod
    waited for room (here: the quota, held by another cell, then the Job controller's retry)
    still gets its whole timeout once it runs. With a deadline of timeout + padding the
    deadline's SIGTERM ended it mid-run (seen: this test, waiter failed "KeyboardInterrupt")."""
    with resource_quota(kube, namespace, "one-at-a-time", {"limits.memory": "300Mi"}):
        d = await k8s(quota_policy="wait", deadline_padding=0)
        blocker = await d.submit(
            {"code": "import time; time.sleep(8)", "memory": "200Mi", "timeout": 60}
        )
        for _ in range(600):  # the blocker holds the quota before the waiter asks for it
            if (await d.get(blocker.id)).status is Status.RUNNING:
                break
            await asyncio.sleep(0.1)
        waiter = await d.submit(
            {"code": "import time; time.sleep(40); print('whole')", "memory": "200Mi",
             "timeout": 45}
        )  # fmt: skip
        assert (await d.wait(blocker.id)).status is Status.SUCCEEDED
        final = await d.wait(waiter.id)
        assert final.status is Status.SUCCEEDED, final.reason
        assert "whole" in stream_text(await d.events(waiter.id))
