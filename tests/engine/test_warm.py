"""Warm sandboxes: started before there is a cell, yet each runs exactly one cell, with that
cell's own code, environment and limits, and nothing of them outlives the backend."""

from __future__ import annotations

import asyncio
import os

import pytest

from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, stream_text


async def _until_warm(backend, n: int) -> None:
    for _ in range(500):
        if len(backend.warm_pool.ready) >= n and not backend.warm_pool.starting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{len(backend.warm_pool.ready)} warm sandboxes, expected {n}")


@pytest.fixture
async def warm(make_dispatcher):
    d = await make_dispatcher(local={"warm_sandboxes": 2})
    backend = d.get_backend("local")
    if backend.bwrap_problem is not None:
        pytest.fail(f"bubblewrap must work on this machine: {backend.bwrap_problem}")
    await _until_warm(backend, 2)
    return d


async def test_cells_run_in_warm_sandboxes_one_each(warm):
    backend = warm.get_backend("local")
    first = {w.proc.pid for w in backend.warm_pool.ready}
    code = (
        "import os\n"
        "print(os.path.exists('/tmp/left-behind'), os.environ['CRUCIBLE_EXECUTION_ID'],"
        " os.environ.get('GREETING'))\n"
        "open('/tmp/left-behind', 'w').write('x')\n"
    )
    seen = []
    for n in range(4):
        execution, events = await run_cell(warm, code, env={"GREETING": f"hello {n}"})
        assert execution.status is Status.SUCCEEDED, stream_text(events)
        assert execution.isolation == "bubblewrap"
        # a fresh /tmp every time, this execution's id and this request's environment
        assert stream_text(events) == f"False {execution.id} hello {n}\n"
        seen.append(execution.id)
    assert len(set(seen)) == 4
    await _until_warm(backend, 2)
    assert not first & {w.proc.pid for w in backend.warm_pool.ready}  # the first two were used up


async def test_a_warm_sandbox_takes_the_cells_memory_limit(warm):
    """Warm sandboxes start with a placeholder limit; the cell's own limit applies."""
    hog = "x = bytearray(200 << 20)\nx[::4096] = b'x' * len(x[::4096])\nprint('survived')\n"
    execution, events = await run_cell(warm, hog, memory="64Mi")
    assert execution.status is Status.FAILED
    assert "memory limit exceeded (64 MiB)" in execution.reason
    execution, events = await run_cell(warm, hog, memory="1Gi")
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert stream_text(events) == "survived\n"


async def test_interrupt_and_timeout_reach_a_warm_sandbox(warm):
    execution = await warm.submit({"code": "import time\nprint('go', flush=True)\ntime.sleep(60)"})
    async for event in warm.subscribe(execution.id):
        if event.type == "stream":
            await warm.cancel(execution.id)
    assert (await warm.wait(execution.id)).status is Status.CANCELLED
    execution, _ = await run_cell(warm, "import time\ntime.sleep(60)", timeout=1)
    assert execution.status is Status.TIMED_OUT


async def test_stop_leaves_no_warm_sandbox_behind(make_dispatcher):
    d = await make_dispatcher(local={"warm_sandboxes": 3})
    backend = d.get_backend("local")
    await _until_warm(backend, 3)
    procs = [w.proc for w in backend.warm_pool.ready]
    groups = [w.group for w in backend.warm_pool.ready if w.group is not None]
    await d.stop()
    assert all(p.returncode is not None for p in procs)
    for pid in (p.pid for p in procs):
        assert not os.path.exists(f"/proc/{pid}")
    assert not [d for g in groups for d in g.dirs.values() if os.path.exists(d)]
    assert not backend.warm_pool.ready


async def test_no_warm_sandboxes_when_turned_off(make_dispatcher):
    d = await make_dispatcher(local={"warm_sandboxes": 0})
    execution, events = await run_cell(d, "print('cold')")
    assert execution.status is Status.SUCCEEDED
    assert stream_text(events) == "cold\n"
    backend = d.get_backend("local")
    await asyncio.sleep(0.2)
    assert not backend.warm_pool.ready
    assert not backend.warm_pool.starting
