"""A cell whose pod cannot start within the cell's timeout (here: a quota it waits for,
``quota_policy="wait"``; on a full cluster: no node with room) times out saying it never
ran: it is never shown as ``running``, and its Job is deleted. Seen with bench_chart at
``executions.maxConcurrent`` 16 on a two-core node: 13 cells were recorded ``running`` and
then "timed out after 60 s" 20 ms later, without having run."""

from __future__ import annotations

import json

from crucible_jupyter.dispatcher.outcome import not_started_reason
from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, statuses
from tests.helpers.k8s import kubectl, wait_until_job_deleted


async def test_a_cell_that_cannot_start_in_time_never_ran(k8s, kube, namespace):
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-room"},
        "spec": {"hard": {"limits.memory": "300Mi"}},
    }
    kubectl(kube, "-n", namespace, "apply", "-f", "-", input=json.dumps(quota))
    try:
        d = await k8s(quota_policy="wait")
        execution, events = await run_cell(d, "print('ran')", memory="1Gi", timeout=4)
        assert execution.status is Status.TIMED_OUT, execution.reason
        assert execution.reason == not_started_reason(4)
        assert "running" not in statuses(events), statuses(events)
        assert not any(e.type == "stream" for e in events)
        await wait_until_job_deleted(kube, namespace, execution.id)
    finally:
        kubectl(kube, "-n", namespace, "delete", "resourcequota", "no-room")
