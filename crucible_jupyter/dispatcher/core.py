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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import output_policy
from ..backends.base import FRAMES, Backend, Sandbox
from ..backends.registry import installed_backends, load_backend_class
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
    Limits,
    Status,
    format_bytes,
    new_execution_id,
    now_ms,
    owner_tag,
)
from ..storage import Storage
from . import frames
from .channel import BEHIND, Changes, Channel
from .queue import WaitQueue
from .recovery import RESTARTED, Recovery, after_restart, owner_alive

T = TypeVar("T")
#: What marks an error frame (the runner writes compact JSON): errors pass the output limit.
_ERROR_FRAME = b'"type":"error"'
_START_FRAME = b'"type":"start"'  # the runner's first line (JSON-escaped text cannot hold it)
_END_FRAME = b'"type":"end"'  # the runner's last line (it counts what it dropped)
#: Bytes of error frames kept beyond the output limit (the traceback that names the failure).
#: Bounded: a cell can send any number of error frames, which would otherwise all be stored.
_ERROR_ROOM = 1 << 20
#: Frames larger than this are parsed (and their rich output sanitized) in a thread.
_PARSE_INLINE = 64 << 10
_STREAM_FRAME = b'"type":"stream"'  # (the runner writes the type before the fields)
_LIMIT_NOTICE = "output limit of {} reached; further output is dropped (an error is still shown)"


@dataclass
class _Run:
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


class CrucibleDispatcher(LoggingConfigurable):
    """Runs execution requests on a backend, streams their events, records everything."""

    # ----- configuration -------------------------------------------------------------

    db_url = Unicode(
        None,
        allow_none=True,
        help="""Database URL (SQLAlchemy form). Default: SQLite in the Jupyter data dir
        (`jupyter --data-dir`/crucible/crucible.db). PostgreSQL:
        postgresql+psycopg://user:password@host/dbname. Env: CRUCIBLE_DB_URL.""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str | None:
        return os.environ.get("CRUCIBLE_DB_URL") or None

    backend = Unicode(
        help="Backend that runs executions unless a request names another. Env: CRUCIBLE_BACKEND.",
    ).tag(config=True)

    @default("backend")
    def _default_backend(self) -> str:
        return os.environ.get("CRUCIBLE_BACKEND", "local")

    enabled_backends = List(
        Unicode(),
        help="""Backends a request may choose with its `backend` field (default: every
        installed backend; one that is not reachable fails that request with its reason).""",
    ).tag(config=True)

    @default("enabled_backends")
    def _default_enabled_backends(self) -> list[str]:
        return installed_backends()

    max_concurrency = Integer(
        help="Most executions running at once on this dispatcher (default: number of CPUs).",
    ).tag(config=True)

    @default("max_concurrency")
    def _default_max_concurrency(self) -> int:
        return max(2, os.cpu_count() or 2)

    max_concurrency_per_user = Integer(
        0, help="Most executions one user may have running at once (0: no per-user limit)."
    ).tag(config=True)

    max_queued_per_user = Integer(
        0,
        min=0,
        help="""Most executions one user may have waiting in the queue at once (0: no
        limit). A submission past it is refused with 429 and a message saying how many are
        queued; the user waits for some to start, or cancels some. It holds for everything
        this dispatcher queues, so for every user of a `crucible serve` service (which is
        the only dispatcher of its database); dispatchers sharing a database each count
        their own.""",
    ).tag(config=True)

    aging_seconds = Float(
        30.0,
        help="""Seconds of waiting that raise a queued execution by one priority level, so
        low priority work cannot starve behind a stream of high priority work.""",
    ).tag(config=True)

    cancel_grace_seconds = Float(
        2.0, help="After a cancel interrupts a running cell, seconds before it is killed."
    ).tag(config=True)

    output_limit = Integer(
        10 << 20,
        help="Bytes of output kept per execution; the rest is dropped and counted (`truncated`).",
    ).tag(config=True)

    flush_interval = Float(
        0.05, help="Seconds between batched writes of output events to storage."
    ).tag(config=True)

    single_dispatcher = Bool(
        False,
        help="""This dispatcher is the only one using the database (the standalone service):
        at start it takes over every unfinished execution, whichever process left it.""",
    ).tag(config=True)

    max_code_bytes = Integer(1 << 20, help="Largest accepted cell source, in bytes.").tag(
        config=True
    )
    default_timeout = Float(60.0, help="Timeout in seconds when a request gives none.").tag(
        config=True
    )
    max_timeout = Float(3600.0, help="Largest timeout a request may ask for, in seconds.").tag(
        config=True
    )
    default_cpu = Float(1.0, help="CPU cores granted when a request gives none.").tag(config=True)
    max_cpu = Float(4.0, help="Most CPU cores a request may ask for.").tag(config=True)
    default_memory = Integer(
        512 << 20, help="Memory in bytes granted when a request gives none."
    ).tag(config=True)
    max_memory = Integer(8 << 30, help="Most memory in bytes a request may ask for.").tag(
        config=True
    )
    allowed_images = List(
        Unicode(), help="Images a request may name (Kubernetes backend); empty: any."
    ).tag(config=True)

    trusted_output_types = List(
        Unicode(),
        help="""MIME types of a cell's rich output passed to every surface (JupyterLab, the API,
        history) unchanged. By default only inert types pass (plain text, LaTeX, JSON, raster
        images), HTML, Markdown and SVG are sanitized and every other type is replaced by a
        notice (see crucible_jupyter/output_policy.py). RISK: a type listed here reaches the
        browser as the cell wrote it, and output of a live session is trusted there: listing
        text/html or application/javascript lets any cell run script in the user's
        JupyterLab, with their session (files, terminals, kernels); a type handled by a
        JavaScript renderer (application/vnd.jupyter.widget-view+json, Plotly's, Vega's) is
        only as safe as that renderer. Env: CRUCIBLE_TRUSTED_OUTPUT_TYPES (comma separated);
        the Jupyter server hands the value to its kernels the same way.""",
    ).tag(config=True)

    @default("trusted_output_types")
    def _default_trusted_output_types(self) -> list[str]:
        return sorted(output_policy.trusted_types_from_env())

    # ----- life cycle ----------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner_tag()
        self.storage: Storage | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._backends: dict[str, Backend] = {}
        self._queue = WaitQueue(self.aging_seconds)
        self._channels: dict[str, Channel] = {}
        self._changes = Changes()
        self._live: dict[str, Execution] = {}
        self._runs: dict[str, _Run] = {}
        self._per_user: Counter = Counter()
        self._submitting: Counter = Counter()  # user -> submissions being stored
        self._flush_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._wake: asyncio.Event | None = None
        self._started = False
        self._scheduling = False
        self._draining = False
        self._stop_reason = "dispatcher stopped while the cell was running"

    @property
    def limits(self) -> Limits:
        """The bounds requests are validated against, from this dispatcher's settings."""
        return Limits(
            max_code_bytes=self.max_code_bytes,
            default_timeout=self.default_timeout,
            max_timeout=self.max_timeout,
            default_cpu=self.default_cpu,
            max_cpu=self.max_cpu,
            default_memory=self.default_memory,
            max_memory=self.max_memory,
            images=tuple(self.allowed_images),
            backends=tuple(dict.fromkeys([self.backend, *self.enabled_backends])),
        )

    @property
    def busy(self) -> bool:
        """True while anything is queued or running here."""
        return bool(self._live)

    async def start(self, *, schedule: bool = True) -> None:
        """Open storage (migrating it), reconcile what a crash left, start scheduling.

        With ``schedule=False`` only storage is opened: enough to read and cancel, and
        nothing left by another process is touched (what read-only commands use).
        """
        if self._started:
            return
        self.storage = Storage(self.db_url)
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
            asyncio.create_task(self._flush_loop(), name="crucible-flusher"),
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
        storage, for the next dispatcher to start. Returns how many still run after the
        grace period (:meth:`stop` then ends them with its reason).
        """
        self._draining = True
        tasks = [r.task for r in self._runs.values() if r.task and not r.task.done()]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        return sum(1 for r in self._runs.values() if r.task and not r.task.done())

    async def stop(self, reason: str | None = None) -> None:
        """Stop scheduling; fail running executions with a reason; flush; close everything.

        ``reason`` is recorded on executions that were still running (default: "dispatcher
        stopped while the cell was running"). Queued executions stay queued in storage and
        are adopted by the next start.
        """
        if not self._started:
            return
        if reason:
            self._stop_reason = reason
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
        for execution_id in list(self._channels):
            await self._flush(execution_id)
        self._changes.close()
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
        except Exception as e:  # only a head start: a failure shows again when a cell starts
            self.log.warning("crucible: backend %s could not prepare: %s", backend.name, e)

    def get_backend(self, name: str) -> Backend:
        """The backend instance for ``name``, created on first use."""
        if name not in self._backends:
            self._backends[name] = load_backend_class(name)(
                parent=self, log=self.log, output_limit=self.output_limit
            )
        return self._backends[name]

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

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
            await self._db(self.storage.create, execution)
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

    def _open_channel(self, execution_id: str, next_seq: int = 0) -> Channel:
        """The live event stream of an execution, with the lock that orders its writes."""
        channel = self._channels[execution_id] = Channel(execution_id, next_seq)
        self._flush_locks[execution_id] = asyncio.Lock()
        return channel

    def _enqueue(self, execution: Execution, next_seq: int = 0) -> None:
        channel = self._open_channel(execution.id, next_seq)
        self._live[execution.id] = execution
        self._queue.push(execution)
        channel.publish(
            "status", {"status": "queued", "position": self._queue.position(execution.id)}
        )
        self._changed(execution)
        self._wake.set()

    async def get(self, execution_id: str) -> Execution:
        """The current record of an execution; NotFound if there is none."""
        self._require_started()
        if execution_id in self._live:
            return self._live[execution_id]
        return await self._db(self.storage.get, execution_id)

    async def events(self, execution_id: str, after: int = -1) -> list[Event]:
        """Every event of an execution with seq > ``after``, stored or still pending."""
        self._require_started()
        channel = self._channels.get(execution_id)
        snapshot = list(channel.pending) if channel else []
        stored = await self._stored_events(execution_id, after)
        if not stored and not snapshot and execution_id not in self._live:
            await self.get(execution_id)  # NotFound for unknown ids
        return _merge(stored, snapshot, after)

    async def _stored_events(self, execution_id: str, after: int) -> list[Event]:
        """Stored events after ``after``, their rich output cleaned by the output policy
        again: a record stored before the policy (or under a wider setting) leaves clean."""
        trusted = frozenset(self.trusted_output_types)
        stored = await self._db(self.storage.events, execution_id, after)
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
        queue = self._changes.watch()
        try:
            while (notice := await queue.get()) is not None:
                yield notice
        finally:
            self._changes.unwatch(queue)

    async def subscribe(self, execution_id: str, after: int = -1) -> AsyncIterator[Event]:
        """Yield the events after ``after``, then live ones, ending with the terminal status.

        However slowly the caller reads, the execution goes on (and times out) on time: what
        it has not read is held up to a bound, past which it reads the rest from storage.
        """
        self._require_started()
        channel = self._channels.get(execution_id)
        if channel is None:
            async for event in self._follow_stored(execution_id, after):
                yield event
            return
        queue = channel.subscribe()
        try:
            last = after
            catch_up = True
            while True:
                if catch_up:  # what came before, or what passed while this one was behind
                    catch_up = False
                    for event in await self.events(execution_id, last):
                        if event.seq <= last:
                            continue
                        yield event
                        last = event.seq
                        if _is_terminal(event):
                            return
                    continue
                event = await queue.get()
                if event is None:
                    break
                if event is BEHIND:
                    catch_up = True
                    continue
                if event.seq <= last:
                    continue
                yield event
                last = event.seq
                if _is_terminal(event):
                    return
            # closed before we saw the end: whatever is left is in storage now
            for event in await self._stored_events(execution_id, last):
                yield event
        finally:
            channel.unsubscribe(queue)

    async def _follow_stored(self, execution_id: str, after: int) -> AsyncIterator[Event]:
        """Events of an execution this process does not run, read from storage."""
        last = after
        while True:
            execution = await self.get(execution_id)
            for event in await self._stored_events(execution_id, last):
                yield event
                last = event.seq
                if _is_terminal(event):
                    return
            if execution.status.terminal:
                return
            await asyncio.sleep(0.1)

    async def wait(self, execution_id: str) -> Execution:
        """Wait until the execution is finished and return its final record."""
        self._require_started()
        channel = self._channels.get(execution_id)
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
            await self._finish(execution, Status.CANCELLED, reason="cancelled while queued")
            return execution
        run = self._runs.get(execution_id)
        if run is None:  # another dispatcher runs it: ask it through storage
            await self._db(self.storage.request_cancel, execution_id)
            if not owner_alive(execution.dispatcher_id):
                return await self._cancel_orphan(execution)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait(execution_id), self.cancel_grace_seconds + 3)
            return await self.get(execution_id)
        if not run.cancelled:
            run.cancelled = True
            run.stopper = asyncio.create_task(self._stop_sandbox(run))
        channel = self._channels.get(execution_id)
        if channel is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(channel.finished.wait(), self.cancel_grace_seconds + 3)
        return await self.get(execution_id)

    async def _cancel_orphan(self, execution: Execution) -> Execution:
        events = await self._db(self.storage.events, execution.id, -1)
        seq = events[-1].seq + 1 if events else 0
        fields = {
            "status": Status.CANCELLED,
            "finished_at": now_ms(),
            "reason": "cancelled; the dispatcher that ran it is gone",
        }
        await self._db(self.storage.update, execution.id, **fields)
        await self._db(
            self.storage.append_events,
            execution.id,
            [
                Event(
                    seq,
                    fields["finished_at"],
                    "status",
                    {"status": "cancelled", "reason": fields["reason"], "exit_code": None},
                )
            ],
        )
        execution = await self._db(self.storage.get, execution.id)
        self._changed(execution)
        return execution

    async def list(self, **filters: Any) -> tuple[list[Execution], str | None]:
        """A page of stored executions, newest first: ``(executions, next_cursor)``.

        Filters: user, status, tag, since, until (ms), cursor, limit.
        """
        self._require_started()
        page, cursor = await self._db(self.storage.list, **filters)
        return [self._live.get(e.id, e) for e in page], cursor

    async def stats(self, **filters: Any) -> dict:
        """Counts by status and p50/p95 durations (filters: user, since)."""
        self._require_started()
        return await self._db(self.storage.stats, **filters)

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
                run = _Run(execution)
                self._runs[execution.id] = run
                self._per_user[execution.user] += 1
                run.task = asyncio.create_task(self._run(run), name=f"crucible-{execution.id}")

    async def _run(self, run: _Run) -> None:
        """Start (or, after a restart, follow again) one execution and record its end."""
        execution = run.execution
        try:
            if run.sandbox is None:
                await self._transition(execution, Status.STARTING)
                backend = self.get_backend(execution.backend)
                try:
                    run.sandbox = await backend.start(execution)
                except CrucibleError as e:
                    await self._finish(execution, Status.FAILED, reason=e.message)
                    return
                # the mark that the cell began (recovery.began): a restart after this point
                # follows or fails it, never runs it a second time
                execution.isolation = run.sandbox.isolation
                await self._db(self.storage.update, execution.id, isolation=execution.isolation)
            sandbox = run.sandbox
            if run.cancelled:
                await sandbox.kill()
            execution.isolation = sandbox.isolation
            try:
                await asyncio.wait_for(sandbox.ready(), execution.request.timeout)
            except asyncio.TimeoutError:
                run.timed_out = True
                await sandbox.kill()
            if execution.status is not Status.RUNNING:
                await self._transition(
                    execution, Status.RUNNING, isolation=sandbox.isolation, started_at=now_ms()
                )
            outcome = await self._supervise(run, sandbox)
            status, reason = self._decide(run, outcome)
            await self._finish(execution, status, reason=reason, exit_code=outcome.exit_code)
        except asyncio.CancelledError:
            if run.sandbox is not None:
                await run.sandbox.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(run.sandbox.wait(), 5)
            await self._finish(execution, Status.FAILED, reason=self._stop_reason)
            raise
        except Exception as e:  # never leave an execution stuck
            self.log.exception("crucible: execution %s failed inside the dispatcher", execution.id)
            if run.sandbox is not None:
                await run.sandbox.kill()
            await self._finish(execution, Status.FAILED, reason=f"internal error: {e!r}")
        finally:
            self._runs.pop(execution.id, None)
            self._per_user[execution.user] -= 1
            if self._per_user[execution.user] <= 0:
                del self._per_user[execution.user]
            if self._wake is not None:
                self._wake.set()

    async def _supervise(self, run: _Run, sandbox: Sandbox):
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
        except BaseException:
            pump.cancel()
            ended.cancel()
            with contextlib.suppress(BaseException):
                await both  # retrieve the outcome so nothing is left unobserved
            raise
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        return await ended

    async def _pump(self, run: _Run, sandbox: Sandbox) -> None:
        execution = run.execution
        channel = self._channels[execution.id]
        limit = self.output_limit
        trusted = frozenset(self.trusted_output_types)
        async for kind, line, dropped in sandbox.lines():
            if dropped:
                execution.truncated = True
                execution.dropped_bytes += len(line) + dropped
                self._notice(
                    run,
                    channel,
                    "frame",
                    f"a single output of {format_bytes(len(line) + dropped)}"
                    " was too large and was dropped",
                )
                continue
            if not run.runner_started and kind == FRAMES and _START_FRAME in line:
                run.runner_started = True
            size = len(line) + 1
            if kind == FRAMES and _END_FRAME in line and (gone := frames.runner_dropped(line)):
                execution.truncated = True  # what the runner dropped at the limit, counted
                execution.dropped_bytes += gone
                continue
            cut = "limit" in run.notices
            if cut and not (kind == FRAMES and _ERROR_FRAME in line):
                # once cut, everything after is dropped too (what fits later would show
                # out of context); only the cell's error still gets through
                execution.dropped_bytes += size
                continue
            if kind != FRAMES:
                parsed = frames.raw_stderr(line)
            elif size > _PARSE_INLINE and _STREAM_FRAME not in line[:100]:
                # a large display costs its sanitizing: not on the loop (stream text does not)
                parsed = await asyncio.to_thread(frames.parse, line, trusted)
            else:
                parsed = frames.parse(line, trusted)
            if parsed is None:
                continue
            if parsed[0] == "error":
                run.last_error = parsed[1]  # names the failure even if it is not kept
                if execution.output_bytes + size > limit + _ERROR_ROOM:
                    # a flood of error frames (or of frames that only quote the marker) would
                    # otherwise pass the limit without end and fill the database
                    execution.truncated = True
                    execution.dropped_bytes += size
                    self._notice(run, channel, "limit", _LIMIT_NOTICE.format(format_bytes(limit)))
                    continue
            elif cut:  # not an error, it only contains the marker (a display of a dict)
                execution.dropped_bytes += size
                continue
            if not cut and execution.output_bytes + size > limit and parsed[0] != "error":
                # the frame that crosses the limit: stream text keeps what fits, the rest goes
                kept = _fit_stream(parsed, size, limit - execution.output_bytes)
                execution.truncated = True
                execution.dropped_bytes += size - (kept[1] if kept else 0)
                if kept:
                    execution.output_bytes += kept[1]
                    self._publish_output(run, channel, "stream", kept[0])
                self._notice(run, channel, "limit", _LIMIT_NOTICE.format(format_bytes(limit)))
                continue
            execution.output_bytes += size
            self._publish_output(run, channel, *parsed)

    @staticmethod
    def _publish_output(run: _Run, channel: Channel, kind: str, data: dict) -> None:
        if run.skip > 0:  # resumed after a restart: this one is stored already
            run.skip -= 1
            return
        channel.publish(kind, data)

    def _notice(self, run: _Run, channel: Channel, key: str, text: str) -> None:
        if key not in run.notices:
            run.notices.add(key)
            self._publish_output(
                run, channel, "stream", {"name": "stderr", "text": f"\n[crucible] {text}\n"}
            )

    def _decide(self, run: _Run, outcome) -> tuple[Status, str | None]:
        timeout = run.execution.request.timeout
        if run.cancelled:
            return Status.CANCELLED, "cancelled by request"
        if run.timed_out:
            return Status.TIMED_OUT, f"timed out after {timeout:g} s"
        if outcome.reason:
            return Status.FAILED, outcome.reason
        code = outcome.exit_code
        if code == 0 and not run.runner_started:  # e.g. a warm pod whose stdin closed first
            return (
                Status.FAILED,
                "the sandbox ended without running the cell (its runner never started)",
            )
        if code == 0:
            return Status.SUCCEEDED, None
        err = run.last_error
        # the runner exits 1 after an exception, 130 after KeyboardInterrupt (raised or SIGINT)
        if err and (code == 1 or (code == 130 and err["ename"] == "KeyboardInterrupt")):
            text = f"{err['ename']}: {err['evalue']}" if err["evalue"] else err["ename"]
            return Status.FAILED, text[:500]
        if outcome.signal:  # known, never guessed from the code: a cell can exit with 137
            with contextlib.suppress(ValueError):
                return Status.FAILED, f"killed by {signal.Signals(outcome.signal).name}"
        return Status.FAILED, f"exited with code {code}"

    async def _stop_sandbox(self, run: _Run) -> None:
        """Interrupt, then kill after the grace period."""
        while run.sandbox is None and run.task and not run.task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # still starting: a few ms at most
        if run.sandbox is None:
            return
        try:
            await run.sandbox.interrupt()
        except Exception as e:  # a background task: say it, and go on to the kill
            self.log.warning("crucible: could not interrupt %s: %s", run.execution.id, e)
        channel = self._channels.get(run.execution.id)
        if channel is None:  # it has ended meanwhile (and its backend may be closed)
            return
        try:
            await asyncio.wait_for(channel.finished.wait(), self.cancel_grace_seconds)
        except asyncio.TimeoutError:
            try:
                await run.sandbox.kill()
            except Exception as e:  # a background task: say it, nobody awaits its result
                self.log.warning("crucible: could not kill %s: %s", run.execution.id, e)

    # ----- status and storage --------------------------------------------------------

    async def _transition(self, execution: Execution, status: Status, **fields: Any) -> None:
        execution.status = status
        for k, v in fields.items():
            setattr(execution, k, v)
        await self._db(self.storage.update, execution.id, status=status, **fields)
        self._channels[execution.id].publish("status", {"status": status.value})
        self._changed(execution)

    def _changed(self, execution: Execution) -> None:
        """Tell watchers of :meth:`changes` that ``execution`` has its status now (stored)."""
        self._changes.notify(
            {"id": execution.id, "status": execution.status.value, "user": execution.user}
        )

    async def _finish(
        self,
        execution: Execution,
        status: Status,
        *,
        reason: str | None,
        exit_code: int | None = None,
    ) -> None:
        """Record a terminal status durably, then tell subscribers, then close the stream.

        The terminal event and every event before it are stored, then the record, and only
        then do subscribers hear of the end: whoever sees a finished execution finds all of
        its events, and a client that exits on the last event loses nothing.
        """
        finished_at = now_ms()
        started_at = execution.started_at
        channel = self._channels.get(execution.id)
        last = None
        if channel is not None:
            last = channel.publish(
                "status",
                {
                    "status": status.value,
                    "reason": reason,
                    "exit_code": exit_code,
                    "duration_ms": None if started_at is None else finished_at - started_at,
                    **({"dropped_bytes": execution.dropped_bytes} if execution.truncated else {}),
                },
                announce=False,
            )
            await self._flush(execution.id)
        fields = {
            "status": status,
            "reason": reason,
            "exit_code": exit_code,
            "finished_at": finished_at,
            "output_bytes": execution.output_bytes,
            "truncated": execution.truncated,
            "dropped_bytes": execution.dropped_bytes,
        }
        if execution.isolation:
            fields["isolation"] = execution.isolation
        for attempt in range(5):
            try:
                await self._db(self.storage.update, execution.id, **fields)
                break
            except StorageError:
                if attempt == 4:
                    self.log.exception("crucible: could not record the end of %s", execution.id)
                else:
                    await asyncio.sleep(0.2 * 2**attempt)
        execution.status = status
        execution.reason = reason
        execution.exit_code = exit_code
        execution.finished_at = finished_at
        self._changed(execution)
        if channel is not None:
            channel.announce(last)
            channel.close()
            self._channels.pop(execution.id, None)
            self._flush_locks.pop(execution.id, None)
        self._live.pop(execution.id, None)

    async def _flush(self, execution_id: str) -> None:
        """Store the pending events of an execution.

        Shielded: a cancelled caller (the flush loop at stop) must not leave a batch
        written but still pending, or the next flush would write it twice and fail.
        """
        channel = self._channels.get(execution_id)
        lock = self._flush_locks.get(execution_id)
        if channel is None or lock is None:
            return
        await asyncio.shield(self._write_pending(execution_id, channel, lock))

    async def _write_pending(self, execution_id: str, channel: Channel, lock: asyncio.Lock) -> None:
        async with lock:
            while channel.pending:
                batch = channel.take_pending(500)
                try:
                    await self._db(self.storage.append_events, execution_id, batch)
                except StorageError:
                    self.log.exception("crucible: could not store output of %s", execution_id)
                    return
                channel.stored(len(batch))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            for execution_id in [i for i, c in self._channels.items() if c.pending]:
                await self._flush(execution_id)

    async def _cancel_watch_loop(self) -> None:
        """Honour cancels requested through storage by other processes (`crucible cancel`)."""
        while True:
            await asyncio.sleep(0.5)
            if not self._live:
                continue
            try:
                wanted = await self._db(self.storage.cancel_requested, list(self._live))
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
        for execution in await self._db(self.storage.unfinished):
            owner = execution.dispatcher_id
            if owner != self.owner and not self.single_dispatcher and owner_alive(owner):
                continue
            events = await self._db(self.storage.events, execution.id, -1)
            next_seq = events[-1].seq + 1 if events else 0
            sandbox, problem = None, None
            if execution.status is not Status.QUEUED:
                sandbox, problem = await self._reattach(execution)
            action = after_restart(execution, sandbox is not None)
            if action is Recovery.RESUME:
                self._resume(execution, sandbox, next_seq, events)
            elif action in (Recovery.ADOPT, Recovery.REQUEUE):
                fields = {"dispatcher_id": self.owner}
                if action is Recovery.REQUEUE:
                    fields["status"] = Status.QUEUED
                await self._db(self.storage.update, execution.id, **fields)
                execution.dispatcher_id = self.owner
                execution.status = Status.QUEUED
                self._enqueue(execution, next_seq)
                self.log.info(
                    "crucible: %s execution %s",
                    "adopted queued" if action is Recovery.ADOPT else "queued again never-begun",
                    execution.id,
                )
            else:
                self._open_channel(execution.id, next_seq)
                reason = RESTARTED if problem is None else f"{RESTARTED} ({problem})"
                await self._finish(
                    execution, Status.FAILED, reason=reason, exit_code=execution.exit_code
                )
                self.log.warning("crucible: %s was running when its dispatcher died", execution.id)

    async def _sweep(self) -> None:
        """As the only dispatcher, remove what a crash left running for no execution."""
        live = set(self._live) | set(self._runs)
        for name in dict.fromkeys([self.backend, *self.enabled_backends]):
            try:
                backend = self.get_backend(name)
                if type(backend).sweep is not Backend.sweep:
                    await backend.sweep(live)
            except Exception as e:
                self.log.warning("crucible: could not sweep backend %s: %s", name, e)

    async def _reattach(self, execution: Execution) -> tuple[Sandbox | None, str | None]:
        """The backend's handle on an execution a dead dispatcher ran, if it still has it,
        and why it could not tell (None when it could)."""
        try:
            return await self.get_backend(execution.backend).reattach(execution), None
        except Exception as e:  # its reason goes on the record: the execution cannot be followed
            self.log.warning("crucible: cannot reattach to %s: %s", execution.id, e)
            return None, f"reattaching failed: {getattr(e, 'message', None) or e!r}"

    def _resume(
        self, execution: Execution, sandbox: Sandbox, next_seq: int, stored: list[Event]
    ) -> None:
        """Follow an execution again after a restart; stored output is not repeated."""
        execution.dispatcher_id = self.owner
        execution.output_bytes = execution.dropped_bytes = 0
        execution.truncated = False
        self._open_channel(execution.id, next_seq)
        self._live[execution.id] = execution
        elapsed = (now_ms() - (execution.started_at or execution.created_at)) / 1000
        run = _Run(
            execution,
            sandbox=sandbox,
            skip=sum(1 for e in stored if e.type != "status"),
            timeout=execution.request.timeout - elapsed,
        )
        self._runs[execution.id] = run
        self._per_user[execution.user] += 1
        run.task = asyncio.create_task(self._run(run), name=f"crucible-{execution.id}")
        self.log.info("crucible: reattached to %s (%d events stored)", execution.id, run.skip)


def _fit_stream(parsed: tuple[str, dict], size: int, room: int) -> tuple[dict, int] | None:
    """The head of a stream frame (``size`` bytes on the wire) that fits in ``room`` bytes,
    and the bytes it counts for; None when it is not stream text or nothing fits."""
    kind, data = parsed
    if kind != "stream":
        return None
    text = data["text"].encode("utf-8")
    overhead = size - len(text)  # the frame's fields (and any JSON escaping) around the text
    head = text[: room - overhead].decode("utf-8", "ignore") if room > overhead else ""
    if not head:
        return None
    return {**data, "text": head}, overhead + len(head.encode("utf-8"))


def _merge(stored: list[Event], pending: list[Event], after: int) -> list[Event]:
    by_seq = {e.seq: e for e in stored}
    by_seq.update({e.seq: e for e in pending})
    return [by_seq[s] for s in sorted(by_seq) if s > after]


def _is_terminal(event: Event) -> bool:
    return event.type == "status" and Status(event.data.get("status")).terminal


Dispatcher = CrucibleDispatcher

__all__ = ["CrucibleDispatcher", "Dispatcher", "NotFound"]
