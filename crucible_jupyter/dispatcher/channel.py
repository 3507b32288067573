"""Live event fan-out for one execution, with resume from a given seq.

A :class:`Channel` numbers events densely from 0, keeps those not yet written to storage
in ``pending``, and pushes each new event to every subscriber's queue. A subscriber that
joins late first reads what it missed (storage + pending), then the live queue; seq
numbers remove the overlap, so nothing is missed and nothing is repeated.
"""

from __future__ import annotations

import asyncio

from ..models import Event, now_ms


class Channel:
    """The ordered event stream of one live execution."""

    def __init__(self, execution_id: str, next_seq: int = 0) -> None:
        self.execution_id = execution_id
        self.next_seq = next_seq
        self.pending: list[Event] = []
        self.subscribers: set[asyncio.Queue] = set()
        self.closed = False
        self.finished = asyncio.Event()

    def publish(self, type_: str, data: dict, *, announce: bool = True) -> Event:
        """Number a new event, keep it until stored, and hand it to every subscriber.

        With ``announce=False`` subscribers get it only from :meth:`announce` (used for
        the terminal status, which is stored before anyone hears of it).
        """
        event = Event(seq=self.next_seq, t=now_ms(), type=type_, data=data)
        self.next_seq += 1
        self.pending.append(event)
        if announce:
            self.announce(event)
        return event

    def announce(self, event: Event) -> None:
        """Hand ``event`` to every subscriber."""
        for q in self.subscribers:
            q.put_nowait(event)

    def take_pending(self, limit: int) -> list[Event]:
        """The oldest pending events (up to ``limit``); call :meth:`stored` once written."""
        return self.pending[:limit]

    def stored(self, count: int) -> None:
        """Forget the first ``count`` pending events: storage has them now."""
        del self.pending[:count]

    def subscribe(self) -> asyncio.Queue:
        """A queue receiving every event published from now on, then ``None`` at close."""
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        if self.closed:
            q.put_nowait(None)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        """Stop delivering to ``q``."""
        self.subscribers.discard(q)

    def close(self) -> None:
        """Mark the stream finished and wake every subscriber."""
        self.closed = True
        self.finished.set()
        for q in self.subscribers:
            q.put_nowait(None)


class Changes:
    """Fan-out of "this execution changed status" notices to every watcher.

    Each watcher has a bounded queue: a watcher that stops reading loses notices (it is told
    with a ``{"overflow": True}`` notice once room is back) instead of growing memory.
    ``close()`` ends every watch.
    """

    def __init__(self, maxsize: int = 1000) -> None:
        self.maxsize = maxsize
        self.watchers: dict[asyncio.Queue, bool] = {}  # queue -> lost a notice since read
        self.closed = False

    def notify(self, notice: dict) -> None:
        """Hand ``notice`` to every watcher that has room for it."""
        for q, lost in self.watchers.items():
            if lost and q.qsize() < self.maxsize - 1:
                q.put_nowait({"overflow": True})
                self.watchers[q] = lost = False
            if q.qsize() < self.maxsize - 1:
                q.put_nowait(notice)
            else:
                self.watchers[q] = True

    def watch(self) -> asyncio.Queue:
        """A queue receiving every notice from now on, then ``None`` at close."""
        q: asyncio.Queue = asyncio.Queue()
        self.watchers[q] = False
        if self.closed:
            q.put_nowait(None)
        return q

    def unwatch(self, q: asyncio.Queue) -> None:
        """Stop delivering to ``q``."""
        self.watchers.pop(q, None)

    def close(self) -> None:
        """End every watch."""
        self.closed = True
        for q in self.watchers:
            q.put_nowait(None)
