"""Live event fan-out for one execution, with resume from a given seq.

A :class:`Channel` numbers events densely from 0, keeps those not yet written to storage
in ``pending``, and hands each new event to every subscriber. A subscriber that joins late
first reads what it missed (storage + pending), then the live events; seq numbers remove
the overlap, so nothing is missed and nothing is repeated.

What a subscriber has not read yet is bounded (:class:`Subscription`): one that falls
further behind (a slow WebSocket client, a stalled terminal) stops collecting, is told it is
:data:`BEHIND`, and reads what it missed from storage + pending as a late joiner does. No
consumer can hold up the publisher (the dispatcher's output pump, the loop that enforces
timeouts) or grow memory without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..models import Event, now_ms

#: What :meth:`Subscription.get` returns once the subscriber fell more than ``limit`` events
#: behind: the events since its last one are in storage (or pending), not in the subscription.
BEHIND = object()


def _size(event: Event) -> int:
    """Roughly the memory ``event`` holds: its strings, one level into ``data`` dicts."""
    size = 100
    for value in event.data.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, dict):
            size += sum(len(v) for v in value.values() if isinstance(v, str))
    return size


class Subscription:
    """The events one subscriber has not read yet: at most ``limit`` events and about
    ``max_bytes`` bytes of them; past either, it is behind."""

    def __init__(self, limit: int, max_bytes: int = 4 << 20) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.events: deque[Event] = deque()
        self.bytes = 0
        self.behind = False
        self.closed = False
        self._ready = asyncio.Event()

    def push(self, event: Event) -> None:
        """Keep ``event`` for the subscriber, or, past ``limit``, forget what it holds and
        mark it behind (it reads them from storage); never waits."""
        if self.behind:
            return
        size = _size(event)
        if len(self.events) >= self.limit or self.bytes + size > self.max_bytes:
            self.events.clear()
            self.bytes = 0
            self.behind = True
        else:
            self.events.append(event)
            self.bytes += size
        self._ready.set()

    def close(self) -> None:
        """No more events will come."""
        self.closed = True
        self._ready.set()

    async def get(self) -> Event | object | None:
        """The next event; :data:`BEHIND` once (then live events again) if it fell behind;
        ``None`` when closed and read to the end."""
        while True:
            if self.events:
                event = self.events.popleft()
                self.bytes -= _size(event)
                return event
            if self.behind:
                self.behind = False
                return BEHIND
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()


class Channel:
    """The ordered event stream of one live execution."""

    #: Unread events (and bytes of them) a subscriber may hold before it must catch up from
    #: storage.
    subscriber_limit = 4096
    subscriber_bytes = 4 << 20

    def __init__(self, execution_id: str, next_seq: int = 0) -> None:
        self.execution_id = execution_id
        self.next_seq = next_seq
        self.pending: list[Event] = []
        self.subscribers: set[Subscription] = set()
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
        """Hand ``event`` to every subscriber (never waits for one)."""
        for sub in self.subscribers:
            sub.push(event)

    def take_pending(self, limit: int) -> list[Event]:
        """The oldest pending events (up to ``limit``); call :meth:`stored` once written."""
        return self.pending[:limit]

    def stored(self, count: int) -> None:
        """Forget the first ``count`` pending events: storage has them now."""
        del self.pending[:count]

    def subscribe(self) -> Subscription:
        """A subscription receiving every event published from now on, then ``None`` at
        close; :data:`BEHIND` where it fell more than :attr:`subscriber_limit` behind."""
        sub = Subscription(self.subscriber_limit, self.subscriber_bytes)
        self.subscribers.add(sub)
        if self.closed:
            sub.close()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""
        self.subscribers.discard(sub)

    def close(self) -> None:
        """Mark the stream finished and wake every subscriber."""
        self.closed = True
        self.finished.set()
        for sub in self.subscribers:
            sub.close()


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
