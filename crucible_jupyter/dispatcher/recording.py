"""The record of the executions a dispatcher handles: live event streams and storage.

Each execution this dispatcher queues or runs has a :class:`~.channel.Channel` (its live
events, numbered) and a lock that orders the writes of its events. Events are written to
storage in batches (:meth:`Recorder.flush_loop`); a status change is stored, then published;
the end of an execution is stored with every event before it, and only then announced, so
whoever sees a finished execution finds all of its events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import StorageError
from ..models import Event, Execution, Status, now_ms
from ..storage import Storage
from .channel import Changes, Channel

#: Runs a storage call off the event loop: ``await db(storage.update, id, **fields)``.
DbCall = Callable[..., Awaitable[Any]]


class Recorder:
    """Live streams and durable records of the executions one dispatcher handles."""

    def __init__(self, db: DbCall, log: logging.Logger) -> None:
        self.db = db
        self.log = log
        self.storage: Storage | None = None  # set when the dispatcher opens it
        self.channels: dict[str, Channel] = {}
        self.live: dict[str, Execution] = {}  # queued or running here, by id
        self.changes = Changes()
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def store(self) -> Storage:
        """The open storage (the dispatcher has started)."""
        assert self.storage is not None, "the dispatcher has not opened its storage"
        return self.storage

    def open_channel(self, execution_id: str, next_seq: int = 0) -> Channel:
        """The live event stream of an execution, with the lock that orders its writes."""
        channel = self.channels[execution_id] = Channel(execution_id, next_seq)
        self._locks[execution_id] = asyncio.Lock()
        return channel

    async def transition(self, execution: Execution, status: Status, **fields: Any) -> None:
        """Store a non-terminal status (and ``fields``), then publish it."""
        execution.status = status
        for k, v in fields.items():
            setattr(execution, k, v)
        await self.db(self.store.update, execution.id, status=status, **fields)
        self.channels[execution.id].publish("status", {"status": status.value})
        self.changed(execution)

    async def mark_began(self, execution: Execution, isolation: str) -> None:
        """Store that a sandbox exists for ``execution`` (its ``isolation``): the mark a
        restarted dispatcher reads as "it began" (``recovery.began``)."""
        execution.isolation = isolation
        await self.db(self.store.update, execution.id, isolation=isolation)

    def changed(self, execution: Execution) -> None:
        """Tell watchers of the change feed that ``execution`` has its status now (stored)."""
        self.changes.notify(
            {"id": execution.id, "status": execution.status.value, "user": execution.user}
        )

    async def finish(
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
        channel = self.channels.get(execution.id)
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
            await self.flush(execution.id)
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
                await self.db(self.store.update, execution.id, **fields)
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
        self.changed(execution)
        if channel is not None:
            if last is not None:
                channel.announce(last)
            channel.close()
            self.channels.pop(execution.id, None)
            self._locks.pop(execution.id, None)
        self.live.pop(execution.id, None)

    async def cancel_orphan(self, execution: Execution) -> Execution:
        """Record the cancel of an execution whose dispatcher is gone (no stream here)."""
        events = await self.db(self.store.events, execution.id, -1)
        seq = events[-1].seq + 1 if events else 0
        reason = "cancelled; the dispatcher that ran it is gone"
        finished_at = now_ms()
        await self.db(
            self.store.update,
            execution.id,
            status=Status.CANCELLED,
            finished_at=finished_at,
            reason=reason,
        )
        end = {"status": "cancelled", "reason": reason, "exit_code": None}
        await self.db(
            self.store.append_events, execution.id, [Event(seq, finished_at, "status", end)]
        )
        execution = await self.db(self.store.get, execution.id)
        self.changed(execution)
        return execution

    async def flush(self, execution_id: str) -> None:
        """Store the pending events of an execution.

        Shielded: a cancelled caller (the flush loop at stop) must not leave a batch
        written but still pending, or the next flush would write it twice and fail.
        """
        channel = self.channels.get(execution_id)
        lock = self._locks.get(execution_id)
        if channel is None or lock is None:
            return
        await asyncio.shield(self._write_pending(execution_id, channel, lock))

    async def _write_pending(self, execution_id: str, channel: Channel, lock: asyncio.Lock) -> None:
        async with lock:
            while channel.pending:
                batch = channel.take_pending(500)
                try:
                    await self.db(self.store.append_events, execution_id, batch)
                except StorageError:
                    self.log.exception("crucible: could not store output of %s", execution_id)
                    return
                channel.stored(len(batch))

    async def flush_loop(self, interval: float) -> None:
        """Store pending events every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            for execution_id in [i for i, c in self.channels.items() if c.pending]:
                await self.flush(execution_id)

    async def flush_all(self) -> None:
        """Store what is pending of every stream (at stop)."""
        for execution_id in list(self.channels):
            await self.flush(execution_id)


def merge(stored: list[Event], pending: list[Event], after: int) -> list[Event]:
    """Stored and pending events after ``after``, by seq, each once."""
    by_seq = {e.seq: e for e in stored}
    by_seq.update({e.seq: e for e in pending})
    return [by_seq[s] for s in sorted(by_seq) if s > after]


def is_terminal(event: Event) -> bool:
    """Whether ``event`` is the terminal status of its execution."""
    return event.type == "status" and Status(event.data.get("status")).terminal
