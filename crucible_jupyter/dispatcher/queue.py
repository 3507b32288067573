"""The waiting room: strict priority with aging, under global and per-user limits.

An entry's *effective* time is its submission time plus ``rank × aging_seconds`` (rank 0
high, 1 normal, 2 low). The entry with the earliest effective time among those whose user
is under the per-user limit runs next. So ``high`` always goes before ``normal`` submitted
in the same window, yet a ``low`` entry that has waited ``2 × aging_seconds`` competes
as if it were ``high``: nothing starves.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from ..models import Execution, Priority


@dataclass
class Entry:
    """One waiting execution."""

    execution: Execution
    enqueued: float = field(default_factory=time.monotonic)
    order: int = 0

    @property
    def user(self) -> str:
        """Who submitted it."""
        return self.execution.user

    @property
    def priority(self) -> Priority:
        """Its requested priority."""
        return self.execution.request.priority


class WaitQueue:
    """Waiting executions, and the choice of which runs next."""

    def __init__(self, aging_seconds: float) -> None:
        self.aging_seconds = aging_seconds
        self._entries: dict[str, Entry] = {}
        self._counter = 0
        self._by_user: Counter = Counter()  # user -> how many of theirs wait

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, execution_id: str) -> bool:
        return execution_id in self._entries

    def push(self, execution: Execution) -> None:
        """Add an execution at the back of its priority."""
        self._counter += 1
        if execution.id in self._entries:  # (pushed again: counted once)
            self._taken(self._entries[execution.id])
        self._entries[execution.id] = Entry(execution, order=self._counter)
        self._by_user[execution.user] += 1

    def _taken(self, entry: Entry) -> None:
        self._by_user[entry.user] -= 1
        if self._by_user[entry.user] <= 0:
            del self._by_user[entry.user]

    def waiting(self, user: str) -> int:
        """How many executions of ``user`` wait."""
        return self._by_user.get(user, 0)

    def remove(self, execution_id: str) -> Execution | None:
        """Take an execution out (e.g. cancelled); None if it was not waiting."""
        entry = self._entries.pop(execution_id, None)
        if entry is None:
            return None
        self._taken(entry)
        return entry.execution

    def _key(self, entry: Entry) -> tuple[float, int]:
        return (entry.enqueued + entry.priority.rank * self.aging_seconds, entry.order)

    def ordered(self) -> list[Entry]:
        """Every waiting entry in the order they would run if no limit applied."""
        return sorted(self._entries.values(), key=self._key)

    def pop_next(self, running_per_user: Counter, per_user_limit: int) -> Execution | None:
        """Remove and return the next execution allowed to run, or None."""
        for entry in self.ordered():
            if per_user_limit <= 0 or running_per_user[entry.user] < per_user_limit:
                del self._entries[entry.execution.id]
                self._taken(entry)
                return entry.execution
        return None

    def position(self, execution_id: str) -> int | None:
        """1-based place in line, or None if not waiting."""
        for i, entry in enumerate(self.ordered(), 1):
            if entry.execution.id == execution_id:
                return i
        return None

    def depth(self) -> dict[str, int]:
        """How many wait at each priority."""
        counts = Counter(e.priority.value for e in self._entries.values())
        return {p.value: counts.get(p.value, 0) for p in Priority}
