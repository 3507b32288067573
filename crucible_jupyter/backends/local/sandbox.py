"""One running local sandbox: its output as it arrives, how it ended, interrupt and kill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Callable

from ...models import format_bytes
from ..base import FRAMES, STDERR, Outcome, Sandbox, read_lines, reported_signal
from . import cgroups, uids
from .launch import LaunchReport

#: The runner's end frame (it may carry the signal that ended the cell).
END_FRAME = re.compile(rb'\{"v":1,"seq":\d+,"t":\d+,"type":"end"[,}]')
#: Longest wait, once the sandbox has exited, for its last frames to be read (normally none).
END_FRAME_WAIT = 10.0


async def off_loop(fn: Callable[[], None]) -> None:
    """Run a short blocking clean-up in a thread, or right here when no thread can be had
    any more (the process is exiting and the executor is shut down)."""
    try:
        await asyncio.to_thread(fn)
    except RuntimeError:
        fn()


class LocalSandbox(Sandbox):
    """One running bubblewrap (or plain) process tree."""

    def __init__(
        self,
        *,
        isolation: str,
        proc: asyncio.subprocess.Process,
        group: cgroups.Group | None,
        memory: int,
        max_processes: int,
        max_line: int,
        workdir: str | None,
        report: LaunchReport,
        lease: uids.Lease | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(isolation=isolation)
        self._on_exit = on_exit
        self.report = report
        self.lease = lease
        self._end: dict | None = None  # the runner's end frame
        self._frames_read: asyncio.Event | None = None  # set once its frames are all read
        self.proc = proc
        self.group = group
        self.memory = memory
        self.max_processes = max_processes
        self.max_line = max_line
        self.workdir = workdir

    async def lines(self) -> AsyncIterator[tuple[str, bytes, int]]:
        """Frames from the runner's stdout and raw text from stderr, as they arrive."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # back-pressure on a flood

        async def pump(kind: str, reader: asyncio.StreamReader) -> None:
            try:
                async for line, dropped in read_lines(reader, self.max_line):
                    if kind == FRAMES and not dropped and END_FRAME.match(line):
                        with contextlib.suppress(ValueError):
                            self._end = json.loads(line)
                    await queue.put((kind, line, dropped))
            finally:
                if kind == FRAMES:
                    frames_read.set()

        frames_read = self._frames_read = asyncio.Event()
        stdout, stderr = self.proc.stdout, self.proc.stderr
        assert stdout is not None  # started with pipes (launch.py)
        assert stderr is not None

        tasks = [
            asyncio.create_task(pump(FRAMES, stdout)),
            asyncio.create_task(pump(STDERR, stderr)),
        ]
        done = asyncio.gather(*tasks)
        getter = None
        try:
            while not (done.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, done], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    item, getter = getter.result(), None
                    yield item
                else:
                    getter.cancel()
                    getter = None
        finally:
            if getter is not None:
                getter.cancel()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await done

    async def wait(self) -> Outcome:
        """Wait for exit; say whether a limit, the launcher or a signal ended it (each known
        from something the cell cannot forge, never from its exit code); remove the cgroup."""
        rc = await self.proc.wait()
        if self._on_exit is not None:
            self._on_exit()
        code = 128 - rc if rc < 0 else rc
        killed_by = -rc if rc < 0 else await self._reported_signal(code)
        reason = None
        if self.group is not None:
            if self.group.oom_killed():
                reason = f"memory limit exceeded ({format_bytes(self.memory)})"
            elif forks := self.group.pids_exhausted():
                reason = (
                    f"process limit reached ({self.max_processes} processes; {forks} forks refused)"
                )
            await off_loop(self.group.remove)
        reason = reason or self.report.failure()
        self.report.close()
        if self.lease is not None:  # the cgroup is empty, or bubblewrap's init is gone
            self.lease.release()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return Outcome(exit_code=code, reason=reason, signal=killed_by)

    async def _reported_signal(self, code: int) -> int | None:
        """The signal that ended the cell, as its runner reported it in its end frame (the
        runner saw the cell's wait status; the cell cannot write frames), if the sandbox's
        exit code agrees. None when the cell exited, or nothing was reported."""
        if self._frames_read is not None:  # the end frame may still be on its way
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._frames_read.wait(), END_FRAME_WAIT)
        return reported_signal(self._end, code)

    async def interrupt(self) -> None:
        """Send ``interrupt`` to the runner, which raises KeyboardInterrupt in the cell."""
        if self.proc.stdin and not self.proc.stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(b"interrupt\n")
                await self.proc.stdin.drain()

    async def kill(self) -> None:
        """SIGKILL the whole tree: the cgroup if any, and the sandbox's process group."""
        if self.group is not None:
            self.group.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
