"""A user may have at most ``max_queued_per_user`` executions waiting; past it, 429."""

from __future__ import annotations

import asyncio

import pytest

from crucible_jupyter.errors import TooManyQueued, http_status
from crucible_jupyter.models import Status

LONG = {"code": "import time\ntime.sleep(60)"}


async def test_submit_past_the_users_queue_limit_is_refused(make_dispatcher):
    d = await make_dispatcher(max_concurrency=1, max_queued_per_user=2)
    running = await d.submit(LONG, user="alice")
    while (await d.get(running.id)).status is Status.QUEUED:
        await asyncio.sleep(0.01)  # it left the queue: it counts as running, not waiting
    waiting = [await d.submit({"code": "pass"}, user="alice") for _ in range(2)]
    with pytest.raises(TooManyQueued) as refused:
        await d.submit({"code": "pass"}, user="alice")
    assert http_status(refused.value) == 429
    assert "already has 2 executions queued" in refused.value.message
    assert "max_queued_per_user = 2" in refused.value.message
    assert "cancel some" in refused.value.message
    other = await d.submit({"code": "pass"}, user="bob")  # another user's queue is their own
    await d.cancel(waiting[0].id)
    again = await d.submit({"code": "pass"}, user="alice")  # room again
    stored, _ = await d.list(user="alice")
    assert len(stored) == 4  # the refused one was never stored
    await d.cancel(running.id)
    for execution in (waiting[1], other, again):
        assert (await d.wait(execution.id)).status is Status.SUCCEEDED


async def test_concurrent_submits_cannot_pass_the_limit(make_dispatcher):
    d = await make_dispatcher(max_concurrency=1, max_queued_per_user=3)
    running = await d.submit(LONG, user="alice")
    while (await d.get(running.id)).status is Status.QUEUED:
        await asyncio.sleep(0.01)
    results = await asyncio.gather(
        *(d.submit({"code": "pass"}, user="alice") for _ in range(10)), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert len(accepted) == 3
    assert all(isinstance(r, TooManyQueued) for r in results if isinstance(r, BaseException))
    await d.cancel(running.id)
