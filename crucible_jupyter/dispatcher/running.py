"""One execution from the moment it leaves the queue to its recorded end.

:class:`Runner` starts the execution on its backend (or follows it again after a restart),
stores the mark that it began, pumps its output through the output limit (``limits.py``)
into its live stream, enforces its wall-clock timeout, and records the status decided from
what the backend saw (``outcome.py``). Whatever goes wrong inside, the execution ends with a
reason: nothing is left ``running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..backends.base import FRAMES, Backend, Outcome, Sandbox
from ..errors import CrucibleError
from ..models import Execution, Status, format_bytes, now_ms
from . import frames
from .channel import Channel
from .limits import LIMIT_NOTICE, Frame, OutputBudget
from .outcome import NEVER_STARTED, decide, not_started_reason
from .recording import Recorder

#: What marks frames the pump looks at without parsing them (the runner writes compact JSON
#: with the type before the fields; JSON-escaped text cannot hold these).
ERROR_FRAME = b'"type":"error"'  # errors pass the output limit
START_FRAME = b'"type":"start"'  # the runner's first line: it has the cell
END_FRAME = b'"type":"end"'  # the runner's last line: it counts what it dropped
STREAM_FRAME = b'"type":"stream"'
#: Frames larger than this are parsed (and their rich output sanitized) in a thread.
PARSE_INLINE = 64 << 10


@dataclass
class Run:
    """Book-keeping for one execution that has left the queue."""

    execution: Execution
    sandbox: Sandbox | None = None
    cancelled: bool = False
    timed_out: bool = False
    last_error: dict | None = None
    task: asyncio.Task | None = None
    stopper: asyncio.Task | None = None
    notices: set = field(default_factory=set)
    runner_started: bool = False  # the runner's start frame was read: it has the cell
    skip: int = 0  # output events already stored before a restart: replayed, not repeated
    timeout: float | None = None  # seconds left, when resumed after a restart
    #: resumed, and it had not begun (no mark): if its sandbox ends without running the cell
    #: (a warm pod claimed, its cell never sent), it is queued again instead of failed
    again_if_unstarted: bool = False


class RunSettings(Protocol):
    """The dispatcher's settings a run reads (read when used: they may change)."""

    output_limit: int
    trusted_output_types: list[str]
    cancel_grace_seconds: float


class Runner:
    """Runs executions on their backends and records how they end."""

    def __init__(
        self,
        recorder: Recorder,
        settings: RunSettings,
        backend: Callable[[str], Backend],
        log: logging.Logger,
    ) -> None:
        self.recorder = recorder
        self.settings = settings
        self.backend = backend
        self.log = log
        #: recorded on executions still running when the dispatcher stops
        self.stop_reason = "dispatcher stopped while the cell was running"
        #: at stop: leave running what a backend can reattach to (``handover_on_stop``)
        self.handover = False

    def can_hand_over(self, run: Run) -> bool:
        """Whether ``run``'s sandbox may be left running at stop for the next dispatcher:
        handover is on, a sandbox exists, and its backend can reattach to it."""
        if not self.handover or run.sandbox is None:
            return False
        backend = self.backend(run.execution.backend)
        return type(backend).reattach is not Backend.reattach

    async def run(self, run: Run) -> bool:
        """Start (or, after a restart, follow again) one execution and record its end.
        True instead when it is to be queued again (``Run.again_if_unstarted``)."""
        execution = run.execution
        rec = self.recorder
        try:
            if run.sandbox is None:
                await rec.transition(execution, Status.STARTING)
                try:
                    run.sandbox = await self.backend(execution.backend).start(execution)
                except CrucibleError as e:
                    await rec.finish(execution, Status.FAILED, reason=e.message)
                    return False
                # from here on a restart follows or fails it, never runs it a second time
                await rec.mark_began(execution, run.sandbox.isolation)
            sandbox = run.sandbox
            if run.cancelled:
                await sandbox.kill()
            execution.isolation = sandbox.isolation
            try:
                await asyncio.wait_for(sandbox.ready(), execution.request.timeout)
            except asyncio.TimeoutError:
                run.timed_out = True
                await sandbox.kill()
                if execution.status is not Status.RUNNING:  # it never ran: not "running"
                    with contextlib.suppress(Exception):  # (releases what the sandbox holds)
                        await asyncio.wait_for(sandbox.wait(), 5)
                    why = not_started_reason(execution.request.timeout)
                    await rec.finish(execution, Status.TIMED_OUT, reason=why)
                    return False
            if execution.status is not Status.RUNNING:
                await rec.transition(
                    execution, Status.RUNNING, isolation=sandbox.isolation, started_at=now_ms()
                )
            outcome = await self._supervise(run, sandbox)
            status, reason = decide(
                outcome,
                cancelled=run.cancelled,
                timed_out=run.timed_out,
                timeout=execution.request.timeout,
                runner_started=run.runner_started,
                last_error=run.last_error,
            )
            if run.again_if_unstarted and (status, reason) == (Status.FAILED, NEVER_STARTED):
                return True
            await rec.finish(execution, status, reason=reason, exit_code=outcome.exit_code)
        except asyncio.CancelledError:
            if self.can_hand_over(run):  # its record stays running: the next start follows it
                self.log.info("crucible: %s left running for the next dispatcher", execution.id)
                raise
            if run.sandbox is not None:
                await run.sandbox.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(run.sandbox.wait(), 5)
            await rec.finish(execution, Status.FAILED, reason=self.stop_reason)
            raise
        except Exception as e:  # never leave an execution stuck (logged with its traceback)
            self.log.exception("crucible: execution %s failed inside the dispatcher", execution.id)
            if run.sandbox is not None:
                await run.sandbox.kill()
            await rec.finish(execution, Status.FAILED, reason=f"internal error: {e!r}")
        return False

    async def _supervise(self, run: Run, sandbox: Sandbox) -> Outcome:
        """Pump output until the sandbox ends, enforcing the wall-clock timeout."""
        pump = asyncio.create_task(self._pump(run, sandbox))
        ended = asyncio.create_task(sandbox.wait())
        both = asyncio.gather(pump, ended)
        try:
            timeout = run.timeout if run.timeout is not None else run.execution.request.timeout
            await asyncio.wait_for(asyncio.shield(both), max(timeout, 0.001))
        except asyncio.TimeoutError:
            run.timed_out = True
            await sandbox.kill()
            try:
                await asyncio.wait_for(asyncio.shield(both), 10)
            except asyncio.TimeoutError:
                pump.cancel()
                self.log.warning("crucible: %s output did not end after kill", run.execution.id)
        except BaseException:  # cancelled too: stop both, then re-raise
            pump.cancel()
            ended.cancel()
            with contextlib.suppress(BaseException):
                await both  # retrieve the outcome so nothing is left unobserved
            raise
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        return await ended

    async def _pump(self, run: Run, sandbox: Sandbox) -> None:
        """Read the sandbox's lines into the live stream, through the output limit."""
        execution = run.execution
        channel = self.recorder.channels[execution.id]
        limit = self.settings.output_limit
        trusted = frozenset(self.settings.trusted_output_types)
        budget = OutputBudget(
            limit, execution.output_bytes, execution.dropped_bytes, execution.truncated
        )
        async for kind, line, dropped in sandbox.lines():
            await self._take(run, channel, budget, trusted, kind, line, dropped)
            # (live: the record shows what was kept and dropped so far)
            execution.output_bytes = budget.kept
            execution.dropped_bytes = budget.dropped
            execution.truncated = budget.truncated

    async def _take(
        self, run: Run, channel: Channel, budget: OutputBudget, trusted: frozenset[str],
        kind: str, line: bytes, dropped: int,
    ) -> None:  # fmt: skip
        """Account for one line of the sandbox and publish what is kept of it."""
        if dropped:  # longer than the backend reads: cut there, and dropped whole
            budget.lost(len(line) + dropped)
            whole = format_bytes(len(line) + dropped)
            self._notice(run, channel, "frame", f"a single output of {whole} was too large"
                         " and was dropped")  # fmt: skip
            return
        frame = kind == FRAMES
        if frame and not run.runner_started and START_FRAME in line:
            run.runner_started = True
        size = len(line) + 1
        if frame and END_FRAME in line and (gone := frames.runner_dropped(line)):
            budget.lost(gone)  # what the runner dropped at the limit, counted
            return
        if budget.skips_unparsed(size, frame and ERROR_FRAME in line):
            return  # once cut, only the cell's error still gets through
        parsed: Frame | None
        if not frame:
            parsed = frames.raw_stderr(line)
        elif size > PARSE_INLINE and STREAM_FRAME not in line[:100]:
            # a large display costs its sanitizing: not on the loop (stream text does not)
            parsed = await asyncio.to_thread(frames.parse, line, trusted)
        else:
            parsed = frames.parse(line, trusted)
        if parsed is None:
            return
        if parsed[0] == "error":
            run.last_error = parsed[1]  # names the failure even if it is not kept
        kept, notice = budget.admit(parsed, size)
        if kept is not None:
            self._publish_output(run, channel, *kept)
        if notice:
            text = LIMIT_NOTICE.format(format_bytes(budget.limit))
            self._notice(run, channel, "limit", text)

    @staticmethod
    def _publish_output(run: Run, channel: Channel, kind: str, data: dict) -> None:
        if run.skip > 0:  # resumed after a restart: this one is stored already
            run.skip -= 1
            return
        channel.publish(kind, data)

    def _notice(self, run: Run, channel: Channel, key: str, text: str) -> None:
        if key not in run.notices:
            run.notices.add(key)
            self._publish_output(
                run, channel, "stream", {"name": "stderr", "text": f"\n[crucible] {text}\n"}
            )

    async def stop_sandbox(self, run: Run) -> None:
        """Interrupt, then kill after the grace period (``cancel_grace_seconds``)."""
        while run.sandbox is None and run.task and not run.task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # still starting: a few ms at most
        if run.sandbox is None:
            return
        try:
            await run.sandbox.interrupt()
        except Exception as e:  # noqa: BLE001 -- a background task: say it, go on to the kill
            self.log.warning("crucible: could not interrupt %s: %s", run.execution.id, e)
        channel = self.recorder.channels.get(run.execution.id)
        if channel is None:  # it has ended meanwhile (and its backend may be closed)
            return
        try:
            await asyncio.wait_for(channel.finished.wait(), self.settings.cancel_grace_seconds)
        except asyncio.TimeoutError:
            try:
                await run.sandbox.kill()
            except Exception as e:  # noqa: BLE001 -- a background task: nobody awaits it
                self.log.warning("crucible: could not kill %s: %s", run.execution.id, e)
