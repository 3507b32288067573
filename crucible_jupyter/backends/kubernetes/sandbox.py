"""One execution's Job (cold, or a claimed warm pod), followed through the shared pod watch
and the pod's log.

Output: the runner writes NDJSON frames to its stdout; the pod's log is followed while it
runs and every frame is handed to the dispatcher (and so to storage) as it arrives, so
output survives the pod's deletion. A pod that ends before its log is opened loses
nothing: the log of a terminated container is read whole.

Outcomes come from the pod status (``pods.outcome``): exit code; OOMKilled → "memory limit
exceeded"; eviction; an image that cannot be pulled fails fast with its reason; a pod
unschedulable past ``unschedulable_timeout`` fails with the scheduler's message; a quota
refusal fails with a clear reason, or waits, as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ...models import Execution, format_bytes
from ..base import FRAMES, Outcome, Sandbox, read_lines
from . import objects, pods
from .cluster import Cluster
from .pods import Pod
from .reflector import PodReflector

READY = objects.READY_LINE.encode()
ENDED = object()  # the container ended while its log was followed
#: The runner's last frame (as its FrameWriter writes it: keys in this order).
END_FRAME = re.compile(rb'\{"v":1,"seq":\d+,"t":\d+,"type":"end"')
#: How often an ended container's log is read whole again while it lacks the end frame
#: (a runner killed by a signal never writes it), and the pause before the first read
#: (the n-th waits n times as long).
WHOLE_READS = 3
WHOLE_READ_PAUSE = 0.2


@dataclass(frozen=True)
class Following:
    """The backend's settings a sandbox follows its pod with."""

    quota_policy: str  # "fail" or "wait" (CrucibleKubernetesBackend.quota_policy)
    unschedulable_timeout: float
    max_line_bytes: int


class KubernetesSandbox(Sandbox):
    """One execution's Job, followed through the shared pod watch and the pod's log. It
    holds the execution in the pod watch (its pod's last state is kept once deleted) until
    :meth:`wait` has its outcome."""

    def __init__(
        self, cluster: Cluster, settings: Following, execution: Execution, name: str, *,
        isolation: str,
    ) -> None:  # fmt: skip
        super().__init__(isolation=isolation)
        self.cluster = cluster
        self.settings = settings
        self.log = cluster.log
        self.execution = execution
        self.name = name
        self.key = objects.label_value(execution.id)
        self.failure: str | None = None
        self.cancelled = False
        self.started: bool | None = None
        self._stopped = asyncio.Event()  # cancel or kill: stop following, record the end now
        self._end: dict | None = None  # the runner's end frame (it may name a signal)
        self._reflector().hold(self.key)

    def _reflector(self) -> PodReflector:
        return self.cluster.pods

    def _started_or_failed(self, pod: Pod | None) -> str | None:
        """'logs' once the container's log can be read; 'failed' if it never will."""
        if pod is None:
            return "failed" if self.key in self._reflector().gone else None
        state = pods.container(pod).get("state") or {}
        if "running" in state or "terminated" in state:
            return "logs"
        self.failure = pods.start_failure(pod)
        return "failed" if self.failure else None

    async def _wait_started(self) -> bool:
        """Wait for the container to start; False (with ``failure``) if it cannot."""
        loop = asyncio.get_running_loop()
        unschedulable_since = None
        while True:
            try:
                result = await self._reflector().wait_for(self.key, self._started_or_failed, 2.0)
                return result == "logs"
            except TimeoutError:
                pass
            pod = self._reflector().pod_for(self.key)
            if pod is None:  # no pod after 2 s: did the Job controller fail to create it?
                problem = await self._job_problem()
                if problem and (self.settings.quota_policy == "fail" or "quota" not in problem):
                    self.failure = problem
                    return False
                continue
            message = pods.unschedulable(pod)
            if message is not None:
                unschedulable_since = unschedulable_since or loop.time()
                if loop.time() - unschedulable_since > self.settings.unschedulable_timeout:
                    self.failure = f"unschedulable: {message}"
                    return False
            else:
                unschedulable_since = None

    async def _job_problem(self) -> str | None:
        try:
            events = await self.cluster.job_events(self.name)
        except Exception:  # noqa: BLE001 -- only a hint: the wait goes on without it
            return None
        return pods.job_problem(events)

    async def ready(self) -> None:
        """Wait until the container runs, or it is clear it never will (``failure``)."""
        if self.started is None:
            self.started = await self._wait_started()

    async def lines(self) -> AsyncIterator[tuple[str, bytes, int]]:
        """The pod's log, line by line, as it is written; reopened if the stream breaks.

        Once the pod watch shows the container ended, the stream ends there if the runner's
        ``end`` frame (the last line it writes) was read, else the rest is read from the log
        whole (complete then): either way without waiting for the kubelet to end the
        followed stream, which it does up to seconds later. A log that ended without the
        end frame is read whole again (``WHOLE_READS`` times at most, each line once)."""
        await self.ready()
        if not self.started:
            return
        consumed = 0
        follow = True
        saw_end = False
        whole_reads = 0  # whole reads after the stream ended without the end frame
        reflector = self._reflector()
        while True:
            pod = reflector.pod_for(self.key) or reflector.gone.get(self.key)
            if pod is None:
                return
            try:
                resp = await self.cluster.open_log(pod["metadata"]["name"], follow=follow)
            except Exception as e:  # noqa: BLE001 -- not readable yet, or gone: see below
                if (self.cancelled or pods.terminated(reflector.pod_for(self.key))) and consumed:
                    return
                if reflector.pod_for(self.key) is None:
                    return
                self.log_warning(f"log of {self.name} not readable yet ({e}); retrying")
                await asyncio.sleep(0.2)
                continue
            index = 0
            lines = read_lines(resp.content, self.settings.max_line_bytes)
            ended = (
                asyncio.ensure_future(reflector.wait_for(self.key, pods.terminated))
                if follow
                else asyncio.get_running_loop().create_future()  # a whole log just ends
            )
            try:
                while (item := await self._next_unless_stopped(lines, ended)) is not None:
                    if item is ENDED:
                        break
                    line, dropped = item
                    index += 1
                    if index <= consumed:
                        continue  # already delivered before the stream broke
                    consumed = index
                    if index == 1 and line == READY:
                        continue  # a warm pod's runner said it was ready: not the cell's
                    if END_FRAME.match(line):
                        saw_end = True
                        self._end = pods.end_frame(line)
                    yield FRAMES, line, dropped
                    if saw_end and pods.terminated(reflector.pod_for(self.key)):
                        return
            except Exception as e:  # noqa: BLE001 -- a broken stream is opened again
                self.log_warning(f"log stream of {self.name} broke ({e!r}); reopening")
                continue
            finally:
                ended.cancel()
                try:
                    await lines.aclose()
                finally:
                    resp.release()
            if item is ENDED:
                if saw_end:
                    return  # the runner's last line was read, and the container ended
                follow = False  # the container ended: read the rest of its log whole
                continue
            # the stream ended: normally because the container ended
            if self.cancelled:
                return  # being deleted: nothing more will come
            try:
                await reflector.wait_for(self.key, lambda p: p is None or pods.terminated(p), 5.0)
            except TimeoutError:
                continue  # still running: the stream broke early; reopen and skip
            if saw_end or whole_reads >= WHOLE_READS or reflector.pod_for(self.key) is None:
                return
            # ended without the runner's last line: the kubelet may have ended the stream
            # before the container's log file held all it wrote (seen under 50 concurrent
            # cells: a cell that succeeded with no output). Read the log whole again.
            whole_reads += 1
            follow = False
            await asyncio.sleep(WHOLE_READ_PAUSE * whole_reads)

    async def _next_unless_stopped(self, lines: AsyncIterator, ended: asyncio.Future) -> Any:
        """The next log line; None at its end or once the execution is being stopped;
        ENDED when ``ended`` (the container's end) comes first."""
        if self._stopped.is_set():
            return None
        nxt = asyncio.ensure_future(anext(lines))
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait({nxt, stop, ended}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (a handover, a stop): the read must end first, or
            await _cancelled(nxt)  # the log's generator cannot close nor its response
            raise  # be released (seen: "aclose(): asynchronous generator is already running")
        finally:
            stop.cancel()
        if nxt not in done:
            await _cancelled(nxt)
            return ENDED if ended in done and stop not in done else None
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None

    def log_warning(self, text: str) -> None:
        """Warn through the backend's logger."""
        self.log.warning("crucible: %s", text)

    def _ended(self, pod: Pod | None) -> Pod | None:
        """The pod once its container has terminated, or its last state once deleted."""
        if pod is None:
            return self._reflector().gone.get(self.key)
        return pod if pods.terminated(pod) else None

    async def wait(self) -> Outcome:
        """Wait for the pod's end and read the outcome from its status; delete the Job
        (in the background: the outcome is known, so it is not kept waiting for that).

        Cancelled, it leaves the Job alone: a dispatcher handing its cells over at stop
        (``handover_on_stop``) leaves them running for the next one, and one ending them
        kills the sandbox itself. (Deleting the Job here sent the pod SIGTERM, which the
        runner turns into an interrupt: a handed-over cell ended with KeyboardInterrupt.)"""
        handed_over = False
        try:
            if self.failure:
                return Outcome(exit_code=None, reason=self.failure)
            ended = asyncio.ensure_future(self._reflector().wait_for(self.key, self._ended))
            stopped = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:  # cancelled: nothing may be left waiting for the pod
                await _cancelled(ended)
                raise
            finally:
                stopped.cancel()
            if not ended.done():  # stopped on purpose: its exit status adds nothing
                await _cancelled(ended)
                return Outcome(exit_code=None)
            memory = format_bytes(self.execution.request.resources.memory)
            return pods.outcome(ended.result(), memory, cancelled=self.cancelled, end=self._end)
        except asyncio.CancelledError:
            handed_over = True
            raise
        finally:
            if self.cluster.reflector is not None:
                self.cluster.reflector.release(self.key)
            if not handed_over:
                self.cluster.later(self.cluster.delete(self.name))

    async def interrupt(self) -> None:
        """Delete the Job (background propagation); its pod gets SIGTERM, which the runner
        turns into an interrupt. The execution ends now: the pod goes on its own."""
        self.cancelled = True
        self._stopped.set()
        await self.cluster.delete(self.name, grace=2)

    async def kill(self) -> None:
        """Delete the Job and its pods at once."""
        self.cancelled = True
        self._stopped.set()
        await self.cluster.delete_pods(self.key, grace=0)
        await self.cluster.delete(self.name, grace=0)


async def _cancelled(task: asyncio.Future) -> None:
    """Cancel ``task`` and wait until it has ended (whatever it ended with)."""
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
