"""The dispatcher: accepts requests, persists them, schedules, runs, streams and records.

One instance lives in the process that serves users (the Jupyter server, the CLI, the
standalone service) and is the only way anything runs. Its promises:

* A request is stored as ``queued`` before anything runs; nothing accepted is lost — a
  queued execution left by a dead dispatcher is adopted by the next one to start.
* Status is decided from what the backend saw (exit code, OOM kill, limits, timeout,
  cancel), never from frames the cell could forge.
* Every execution reaches a terminal status: errors inside the dispatcher fail the
  execution with a reason instead of leaving it ``running``.
* Output is streamed to any number of subscribers as it arrives (late ones resume from a
  seq) and written to storage in batches while the cell runs; past the output limit it is
  dropped and counted, so memory stays bounded.

This module holds the public API, the queue and the life cycle; the rest, one job each:
``settings.py`` the settings, ``running.py`` one execution from start to end,
``limits.py`` the output limit and ``outcome.py`` the terminal status (both pure),
``recording.py`` the live streams and the durable record, ``recovery.py`` what a restart
does with what a dead dispatcher left, ``queue.py`` which execution runs next.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from .. import output_policy
from ..backends.base import Backend, Sandbox
from ..backends.registry import load_backend_class
from ..errors import (
    Conflict,
    CrucibleError,
    NotFound,
    StorageError,
    TooManyQueued,
    Unavailable,
)
from ..models import (
    Event,
    Execution,
    ExecutionRequest,
    Resources,
    Status,
    new_execution_id,
    now_ms,
    owner_tag,
)
from ..storage import Storage
from .channel import BEHIND
from .queue import WaitQueue
from .recording import Recorder, is_terminal, merge
from .recovery import RESTARTED, Recovery, after_restart, began, owner_alive
from .running import Run, Runner
from .settings import DispatcherSettings

T = TypeVar("T")


class CrucibleDispatcher(DispatcherSettings):
    """Runs execution requests on a backend, streams their events, records everything.

    Its settings (``c.CrucibleDispatcher.*``) are defined in ``settings.py``."""

    # ----- life cycle ----------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner_tag()
        self.storage: Storage | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._backends: dict[str, Backend] = {}
        self._queue = WaitQueue(self.aging_seconds)
        self._rec = Recorder(self._db, self.log)
        self._runner = Runner(self._rec, self, self.get_backend, self.log)
        self._runs: dict[str, Run] = {}
        self._per_user: Counter = Counter()
        self._submitting: Counter = Counter()  # user -> submissions being stored
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._wake = asyncio.Event()  # made again by start(), in the loop that runs it
        self._started = False
        self._scheduling = False
        self._draining = False

    @property
    def busy(self) -> bool:
        """True while anything is queued or running here."""
        return bool(self._rec.live)

    async def start(self, *, schedule: bool = True) -> None:
        """Open storage (migrating it), reconcile what a crash left, start scheduling.

        With ``schedule=False`` only storage is opened: enough to read and cancel, and
        nothing left by another process is touched (what read-only commands use).
        """
        if self._started:
            return
        self.storage = self._rec.storage = Storage(self.db_url)
        sqlite = self.storage.dialect == "sqlite"
        self._executor = ThreadPoolExecutor(1 if sqlite else 4, thread_name_prefix="crucible-db")
        self._wake = asyncio.Event()
        await self._db(self.storage.migrate)
        self.get_backend(self.backend)  # fail early on a misconfigured default backend
        self._started = True
        self._scheduling = schedule
        if not schedule:
            return
        await self._reconcile()
        if self.single_dispatcher:
            await self._sweep()
        self._loops = [
            asyncio.create_task(self._schedule_loop(), name="crucible-scheduler"),
            asyncio.create_task(self._rec.flush_loop(self.flush_interval), name="crucible-flusher"),
            asyncio.create_task(self._cancel_watch_loop(), name="crucible-cancel-watch"),
        ]
        prepare = asyncio.ensure_future(self._prepare(self.get_backend(self.backend)))
        self._tasks.add(prepare)
        prepare.add_done_callback(self._tasks.discard)
        self.log.info(
            "crucible dispatcher started: backend=%s storage=%s concurrency=%d",
            self.backend,
            self.storage,
            self.max_concurrency,
        )

    async def drain(self, grace: float) -> int:
        """Accept and start nothing more, and wait up to ``grace`` seconds for what runs to end.

        Submissions are refused (Unavailable) from now on; queued executions stay queued in
        storage, for the next dispatcher to start. With ``handover_on_stop``, cells a
        backend can reattach to are not waited for: :meth:`stop` leaves them running for the
        next dispatcher. Returns how many still run after the grace period and will be ended
        (:meth:`stop` ends them with its reason).
        """
        self._draining = True
        self._runner.handover = self.handover_on_stop
        tasks = [
            r.task
            for r in self._runs.values()
            if r.task and not r.task.done() and not self._runner.can_hand_over(r)
        ]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        return sum(1 for t in tasks if not t.done())

    async def stop(self, reason: str | None = None) -> None:
        """Stop scheduling; fail running executions with a reason; flush; close everything.

        ``reason`` is recorded on executions that were still running (default: "dispatcher
        stopped while the cell was running"). Queued executions stay queued in storage and
        are adopted by the next start.
        """
        if not self._started:
            return
        if reason:
            self._runner.stop_reason = reason
        self._runner.handover = self.handover_on_stop
        self._started = False
        self._scheduling = False
        for task in self._loops:  # first: nothing new may start while we wind down
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        tasks = [r.task for r in self._runs.values() if r.task] + [
            r.stopper for r in self._runs.values() if r.stopper
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        await self._rec.flush_all()
        self._rec.changes.close()
        for backend in self._backends.values():
            with contextlib.suppress(Exception):
                await backend.close()
        if self.storage:
            await self._db(self.storage.close)
        if self._executor:
            self._executor.shutdown(wait=True)

    async def _prepare(self, backend: Backend) -> None:
        try:
            await backend.prepare()
        except Exception as e:  # noqa: BLE001 -- only a head start: a failure shows again when a cell starts
            self.log.warning("crucible: backend %s could not prepare: %s", backend.name, e)

    def get_backend(self, name: str) -> Backend:
        """The backend instance for ``name``, created on first use."""
        if name not in self._backends:
            cls = load_backend_class(name)
            given = {  # what a backend takes from its dispatcher, if it declares it
                "output_limit": self.output_limit,
                "dispatcher_owner": self.owner,
                "default_resources": Resources(self.default_cpu, self.default_memory),
            }
            traits = cls.class_trait_names()
            self._backends[name] = cls(
                parent=self, log=self.log, **{k: v for k, v in given.items() if k in traits}
            )
        return self._backends[name]

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @property
    def _store(self) -> Storage:
        """The storage start() opened (everything that uses it runs after start)."""
        if self.storage is None:
            raise Unavailable(
                "the crucible dispatcher is not running; start it (or the server) first"
            )
        return self.storage

    def _require_started(self) -> None:
        if not self._started:
            raise Unavailable(
                "the crucible dispatcher is not running; start it (or the server) first"
            )

    # ----- the public API ------------------------------------------------------------

    async def submit(self, request: dict | ExecutionRequest, user: str = "local") -> Execution:
        """Validate, persist as ``queued``, and enqueue a request. Returns the new record."""
        self._require_started()
        if not self._scheduling:
            raise Unavailable("this dispatcher was started read-only (schedule=False)")
        if self._draining:
            raise Unavailable(
                "crucible is shutting down and accepts no new executions; submit again once"
                " it is back (in a moment, if it is restarting)"
            )
        if not isinstance(request, ExecutionRequest):
            request = ExecutionRequest.from_dict(request, self.limits)
        backend = request.backend or self.backend
        self.get_backend(backend).admit(request)
        user = user or "local"
        self._admit_queued(user)
        execution = Execution(
            id=new_execution_id(),
            request=request,
            user=user,
            backend=backend,
            dispatcher_id=self.owner,
        )
        self._submitting[user] += 1  # counted while stored: concurrent submits see it
        try:
            await self._db(self._store.create, execution)
        finally:
            self._submitting[user] -= 1
            if self._submitting[user] <= 0:
                del self._submitting[user]
        self._enqueue(execution)
        return execution

    def _admit_queued(self, user: str) -> None:
        """Refuse (429) a submission past ``max_queued_per_user``."""
        limit = self.max_queued_per_user
        queued = self._queue.waiting(user) + self._submitting[user]
        if limit > 0 and queued >= limit:
            raise TooManyQueued(
                f"user {user!r} already has {queued} execution{'s' * (queued != 1)} queued, the"
                f" most one user may have waiting (max_queued_per_user = {limit}); wait until"
                " some have started, or cancel some, then submit again"
            )

    def _enqueue(self, execution: Execution, next_seq: int = 0) -> None:
        channel = self._rec.open_channel(execution.id, next_seq)
        self._rec.live[execution.id] = execution
        self._queue.push(execution)
        channel.publish(
            "status", {"status": "queued", "position": self._queue.position(execution.id)}
        )
        self._rec.changed(execution)
        self._wake.set()

    async def get(self, execution_id: str) -> Execution:
        """The current record of an execution; NotFound if there is none."""
        self._require_started()
        if execution_id in self._rec.live:
            return self._rec.live[execution_id]
        return await self._db(self._store.get, execution_id)

    async def events(self, execution_id: str, after: int = -1) -> list[Event]:
        """Every event of an execution with seq > ``after``, stored or still pending."""
        self._require_started()
        channel = self._rec.channels.get(execution_id)
        snapshot = list(channel.pending) if channel else []
        stored = await self._stored_events(execution_id, after)
        if not stored and not snapshot and execution_id not in self._rec.live:
            await self.get(execution_id)  # NotFound for unknown ids
        return merge(stored, snapshot, after)

    async def _stored_events(self, execution_id: str, after: int) -> list[Event]:
        """Stored events after ``after``, their rich output cleaned by the output policy
        again: a record stored before the policy (or under a wider setting) leaves clean."""
        trusted = frozenset(self.trusted_output_types)
        stored = await self._db(self._store.events, execution_id, after)
        if not any(e.type in output_policy.DISPLAY_KINDS for e in stored):
            return stored

        def clean() -> list[Event]:
            return [
                Event(e.seq, e.t, e.type, output_policy.clean_output(e.type, e.data, trusted))
                if e.type in output_policy.DISPLAY_KINDS
                else e
                for e in stored
            ]

        return await asyncio.to_thread(clean)  # up to ~1 s per MB: not on the loop

    async def changes(self) -> AsyncIterator[dict]:
        """Yield ``{"id", "status", "user"}`` each time an execution this dispatcher handles
        is queued, starts, runs or ends (once the record says so), until the dispatcher
        stops. A watcher too slow to keep up gets ``{"overflow": True}`` where it lost
        notices. Executions run by other dispatchers sharing the database are not seen."""
        self._require_started()
        queue = self._rec.changes.watch()
        try:
            while (notice := await queue.get()) is not None:
                yield notice
        finally:
            self._rec.changes.unwatch(queue)

    async def subscribe(self, execution_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Yield the events after ``after``, then live ones, ending with the terminal status.

        However slowly the caller reads, the execution goes on (and times out) on time: what
        it has not read is held up to a bound, past which it reads the rest from storage.
        An execution another process runs is followed in storage.
        """
        self._require_started()
        channel = self._rec.channels.get(execution_id)
        queue = channel.subscribe() if channel is not None else None
        last = after
        try:
            while True:
                # storage, when no live stream: what is stored once the record says it ended
                # is all there is (the end is stored before the record)
                ended = queue is None and (await self.get(execution_id)).status.terminal
                for event in await self.events(execution_id, last):  # what came before, or
                    if event.seq > last:  # what passed while this one was behind
                        yield event
                        last = event.seq
                        if is_terminal(event):
                            return
                if queue is None:
                    if ended:
                        # nothing after ``after`` although it ended: the caller's seq came from
                        # a dispatcher that died before storing it (a restart numbers on from
                        # what was stored). The recorded end is what the caller lacks.
                        if last == after and (end := await self._recorded_end(execution_id)):
                            yield end
                        return
                    await asyncio.sleep(0.1)
                    continue
                assert channel is not None  # the queue came from it
                while (item := await queue.get()) is not None and item is not BEHIND:
                    event = cast(Event, item)  # neither the end (None) nor BEHIND
                    if event.seq > last:
                        yield event
                        last = event.seq
                        if is_terminal(event):
                            return
                if item is None:  # closed before we saw the end: the rest is in storage
                    channel.unsubscribe(queue)
                    queue = None
        finally:
            if queue is not None and channel is not None:  # the queue came from the channel
                channel.unsubscribe(queue)

    async def _recorded_end(self, execution_id: str) -> Event | None:
        """The stored terminal status event of an ended execution (None if not stored)."""
        stored = await self._stored_events(execution_id, -1)
        return stored[-1] if stored and is_terminal(stored[-1]) else None

    async def wait(self, execution_id: str) -> Execution:
        """Wait until the execution is finished and return its final record."""
        self._require_started()
        channel = self._rec.channels.get(execution_id)
        if channel is not None:
            await channel.finished.wait()
            return await self.get(execution_id)
        # another process runs it: storage is the only shared channel
        while not (execution := await self.get(execution_id)).status.terminal:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        return execution

    async def cancel(self, execution_id: str) -> Execution:
        """Cancel: a queued execution at once; a running one by SIGINT, then SIGKILL.

        Returns the record once it is terminal (or after the grace period). Conflict if
        the execution had already finished.
        """
        execution = await self.get(execution_id)
        if execution.status.terminal:
            raise Conflict(
                f"execution {execution_id} already {execution.status.value}; nothing to cancel"
            )
        if self._queue.remove(execution_id):
            await self._rec.finish(execution, Status.CANCELLED, reason="cancelled while queued")
            return execution
        run = self._runs.get(execution_id)
        if run is None:  # another dispatcher runs it: ask it through storage
            await self._db(self._store.request_cancel, execution_id)
            if not owner_alive(execution.dispatcher_id):
                return await self._rec.cancel_orphan(execution)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait(execution_id), self.cancel_grace_seconds + 3)
            return await self.get(execution_id)
        if not run.cancelled:
            run.cancelled = True
            run.stopper = asyncio.create_task(self._runner.stop_sandbox(run))
        channel = self._rec.channels.get(execution_id)
        if channel is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(channel.finished.wait(), self.cancel_grace_seconds + 3)
        return await self.get(execution_id)

    async def list(self, **filters: Any) -> tuple[list[Execution], str | None]:
        """A page of stored executions, newest first: ``(executions, next_cursor)``.

        Filters: user, status, tag, since, until (ms), cursor, limit.
        """
        self._require_started()
        page, cursor = await self._db(self._store.list, **filters)
        return [self._rec.live.get(e.id, e) for e in page], cursor

    async def stats(self, **filters: Any) -> dict:
        """Counts by status and p50/p95 durations (filters: user, since)."""
        self._require_started()
        return await self._db(self._store.stats, **filters)

    def queue_status(self, execution_id: str | None = None) -> dict:
        """Depth per priority, running count, capacity, and ``execution_id``'s position."""
        return {
            "depth": self._queue.depth(),
            "queued": len(self._queue),
            "running": len(self._runs),
            "capacity": self.max_concurrency,
            "per_user_limit": self.max_concurrency_per_user,
            "per_user_queue_limit": self.max_queued_per_user,
            "position": self._queue.position(execution_id) if execution_id else None,
        }

    # ----- running -------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._runs) < self.max_concurrency and not self._draining:
                execution = self._queue.pop_next(self._per_user, self.max_concurrency_per_user)
                if execution is None:
                    break
                run = Run(execution)
                self._runs[execution.id] = run
                self._per_user[execution.user] += 1
                run.task = asyncio.create_task(self._run(run), name=f"crucible-{execution.id}")

    async def _run(self, run: Run) -> None:
        """Run one execution (``running.py``), then give its slot back."""
        execution = run.execution
        again = False
        try:
            again = await self._runner.run(run)
        finally:
            self._runs.pop(execution.id, None)
            self._per_user[execution.user] -= 1
            if self._per_user[execution.user] <= 0:
                del self._per_user[execution.user]
            self._wake.set()
        if again:  # resumed, and its sandbox ended without the cell: it never began
            await self._rec.transition(execution, Status.QUEUED, isolation=None)
            self._queue.push(execution)
            self._wake.set()
            self.log.info("crucible: queued again never-begun execution %s", execution.id)

    async def _cancel_watch_loop(self) -> None:
        """Honour cancels requested through storage by other processes (`crucible cancel`)."""
        while True:
            await asyncio.sleep(0.5)
            if not self._rec.live:
                continue
            try:
                wanted = await self._db(self._store.cancel_requested, list(self._rec.live))
            except StorageError:
                continue
            for execution_id in wanted:
                task = asyncio.create_task(self._cancel_quietly(execution_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _cancel_quietly(self, execution_id: str) -> None:
        with contextlib.suppress(CrucibleError):
            await self.cancel(execution_id)

    async def _reconcile(self) -> None:
        """Take over what a dead dispatcher left unfinished (see ``recovery.py``): queued
        and never-begun executions are queued here, those whose sandbox is still there are
        followed again, those that began and whose sandbox is gone fail with a reason."""
        for execution in await self._db(self._store.unfinished):
            owner = execution.dispatcher_id
            if owner != self.owner and not self.single_dispatcher and owner_alive(owner):
                continue
            events = await self._db(self._store.events, execution.id, -1)
            next_seq = events[-1].seq + 1 if events else 0
            sandbox, problem = None, None
            if execution.status is not Status.QUEUED:
                sandbox, problem = await self._reattach(execution)
            action = after_restart(execution, sandbox is not None)
            if action is Recovery.RESUME:
                assert sandbox is not None  # RESUME: its sandbox was found
                self._resume(execution, sandbox, next_seq, events)
            elif action in (Recovery.ADOPT, Recovery.REQUEUE):
                fields = {"dispatcher_id": self.owner}
                if action is Recovery.REQUEUE:
                    fields["status"] = Status.QUEUED
                await self._db(self._store.update, execution.id, **fields)
                execution.dispatcher_id = self.owner
                execution.status = Status.QUEUED
                self._enqueue(execution, next_seq)
                self.log.info(
                    "crucible: %s execution %s",
                    "adopted queued" if action is Recovery.ADOPT else "queued again never-begun",
                    execution.id,
                )
            else:
                self._rec.open_channel(execution.id, next_seq)
                reason = RESTARTED if problem is None else f"{RESTARTED} ({problem})"
                await self._rec.finish(
                    execution, Status.FAILED, reason=reason, exit_code=execution.exit_code
                )
                self.log.warning("crucible: %s was running when its dispatcher died", execution.id)

    async def _sweep(self) -> None:
        """As the only dispatcher, remove what a crash left running for no execution."""
        live = set(self._rec.live) | set(self._runs)
        for name in dict.fromkeys([self.backend, *self.enabled_backends]):
            try:
                backend = self.get_backend(name)
                if type(backend).sweep is not Backend.sweep:
                    await backend.sweep(live)
            except Exception as e:  # noqa: BLE001 -- one backend's failure must not stop the others' sweep
                self.log.warning("crucible: could not sweep backend %s: %s", name, e)

    async def _reattach(self, execution: Execution) -> tuple[Sandbox | None, str | None]:
        """The backend's handle on an execution a dead dispatcher ran, if it still has it,
        and why it could not tell (None when it could)."""
        try:
            return await self.get_backend(execution.backend).reattach(execution), None
        except Exception as e:  # noqa: BLE001 -- its reason goes on the record: the execution cannot be followed
            self.log.warning("crucible: cannot reattach to %s: %s", execution.id, e)
            return None, f"reattaching failed: {getattr(e, 'message', None) or e!r}"

    def _resume(
        self, execution: Execution, sandbox: Sandbox, next_seq: int, stored: builtins.list[Event]
    ) -> None:
        """Follow an execution again after a restart; stored output is not repeated."""
        execution.dispatcher_id = self.owner
        execution.output_bytes = execution.dropped_bytes = 0
        execution.truncated = False
        self._rec.open_channel(execution.id, next_seq)
        self._rec.live[execution.id] = execution
        elapsed = (now_ms() - (execution.started_at or execution.created_at)) / 1000
        run = Run(
            execution,
            sandbox=sandbox,
            skip=sum(1 for e in stored if e.type != "status"),
            timeout=execution.request.timeout - elapsed,
            again_if_unstarted=not began(execution),
        )
        self._runs[execution.id] = run
        self._per_user[execution.user] += 1
        run.task = asyncio.create_task(self._run(run), name=f"crucible-{execution.id}")
        self.log.info("crucible: reattached to %s (%d events stored)", execution.id, run.skip)


Dispatcher = CrucibleDispatcher

__all__ = ["CrucibleDispatcher", "Dispatcher", "NotFound"]
