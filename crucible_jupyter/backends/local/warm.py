"""Warm sandboxes: started before there is a cell, each waiting for exactly one cell.

A cold cell waits for bubblewrap and Python to start (most of its latency). A warm sandbox
has done that; its runner waits for its cell on stdin. Claiming one hands it the cell's limits
(its cgroup is changed: it started with :data:`WARM_MEMORY`) and then the cell as one JSON line
(``{"code", "env", "rlimit_as"}``). It stays one-shot: it runs that cell, ends and is
discarded like any other sandbox; the pool starts another in the background once the cell has
ended (not beside it: a start-up running beside the cell would slow the cell down).

The pool is given a factory that starts one warm sandbox; it knows nothing else of the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from . import cgroups, uids
from .launch import LaunchReport
from .sandbox import off_loop

#: Memory limit of a warm sandbox until it is handed a cell (then: the cell's limit).
WARM_MEMORY = 256 << 20

T = TypeVar("T")


@dataclass
class Warm:
    """A started sandbox whose runner waits for its cell on stdin."""

    proc: asyncio.subprocess.Process
    group: cgroups.Group | None
    report: LaunchReport
    lease: uids.Lease | None  # its host uid, as root

    async def discard(self) -> None:
        """End it without a cell: kill it, remove its cgroup, release its uid."""
        if self.group is not None:
            self.group.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()
        if self.group is not None:
            await off_loop(self.group.remove)
        self.report.close()
        if self.lease is not None:
            self.lease.release()  # nothing of the sandbox runs any more


class WarmPool:
    """Keeps ``size`` warm sandboxes started by ``start`` and hands them to cells."""

    def __init__(
        self, size: int, start: Callable[[], Awaitable[Warm]], log: logging.Logger | None = None
    ) -> None:
        self.size = size
        self.start = start
        self.log = log or logging.getLogger(__name__)
        self.ready: list[Warm] = []  # started, waiting for a cell
        self.starting: set[asyncio.Task] = set()
        self.closed = False

    def fill(self) -> None:
        """Start sandboxes in the background until ``size`` wait for a cell."""
        missing = self.size - len(self.ready) - len(self.starting)
        for _ in range(0 if self.closed else missing):
            task = asyncio.ensure_future(self._start_one())
            self.starting.add(task)
            task.add_done_callback(self.starting.discard)

    async def _start_one(self) -> None:
        try:
            warm = await self.start()
        except Exception as e:  # noqa: BLE001 -- whatever failed, the next cell starts its own
            self.log.warning("crucible: could not start a warm sandbox: %s", e)
            return
        if self.closed:
            await warm.discard()
        else:
            self.ready.append(warm)

    async def claim(self, hand_over: Callable[[Warm], Awaitable[T]]) -> T | None:
        """What ``hand_over`` makes of a warm sandbox (it gives the sandbox its cell), waiting
        for one that is being started if none is ready (starting another beside it would
        only compete for the CPU); None when none can be had. ``hand_over`` raises OSError or
        RuntimeError when the sandbox cannot take the cell: another one is tried."""
        for _ in range(self.size + 1):
            if not self.ready:
                self.fill()
                if not self.starting:
                    return None
                await asyncio.wait(set(self.starting), return_when=asyncio.FIRST_COMPLETED)
            sandbox = await self._take(hand_over)
            if sandbox is not None:
                if not self.ready:  # else refill when this one ends: a start-up running
                    self.fill()  # beside the cell would slow the cell down
                return sandbox
        return None

    async def _take(self, hand_over: Callable[[Warm], Awaitable[T]]) -> T | None:
        """Hand a ready sandbox over; None if none is ready (the caller starts its own)."""
        while self.ready:
            warm = self.ready.pop(0)
            if warm.proc.returncode is not None or warm.proc.stdin is None:
                await warm.discard()
                continue
            try:
                return await hand_over(warm)
            except (OSError, RuntimeError) as e:
                self.log.debug("crucible: warm sandbox unusable (%s); trying another", e)
                await warm.discard()
        return None

    async def close(self) -> None:
        """Start no more; end the sandboxes being started and those waiting."""
        self.closed = True
        for task in list(self.starting):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        warm, self.ready = self.ready, []
        await asyncio.gather(*(w.discard() for w in warm))
