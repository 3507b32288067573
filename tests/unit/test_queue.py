"""The waiting room's choice: priority, aging, per-user limits."""

from __future__ import annotations

from collections import Counter

from crucible_jupyter.dispatcher.queue import WaitQueue
from crucible_jupyter.models import Execution, ExecutionRequest, Priority


def _ex(i: int, priority: str = "normal", user: str = "u") -> Execution:
    return Execution(
        id=str(i), user=user, request=ExecutionRequest(code="", priority=Priority(priority))
    )


def test_strict_priority_then_fifo():
    q = WaitQueue(aging_seconds=1000)
    for i, p in enumerate(["low", "normal", "high", "normal", "high"]):
        q.push(_ex(i, p))
    order = [q.pop_next(Counter(), 0).id for _ in range(5)]
    assert order == ["2", "4", "1", "3", "0"]
    assert q.pop_next(Counter(), 0) is None


def test_aging_promotes_waiting_entries():
    q = WaitQueue(aging_seconds=10)
    q.push(_ex(1, "low"))
    q._entries["1"].enqueued -= 25  # waited 25 s: more than two levels
    q.push(_ex(2, "high"))
    assert q.pop_next(Counter(), 0).id == "1"


def test_per_user_limit_skips_busy_users():
    q = WaitQueue(aging_seconds=1000)
    q.push(_ex(1, "high", "alice"))
    q.push(_ex(2, "low", "bob"))
    assert q.pop_next(Counter({"alice": 1}), 1).id == "2"
    assert q.pop_next(Counter({"alice": 1}), 1) is None
    assert q.position("1") == 1
    assert q.depth() == {"high": 1, "normal": 0, "low": 0}


def test_waiting_counts_each_users_entries():
    q = WaitQueue(aging_seconds=1000)
    for i, user in enumerate(["alice", "alice", "bob"]):
        q.push(_ex(i, user=user))
    q.push(_ex(0, user="alice"))  # pushed again: counted once
    assert (q.waiting("alice"), q.waiting("bob"), q.waiting("carol")) == (2, 1, 0)
    q.remove("0")
    q.pop_next(Counter(), 0)
    assert (q.waiting("alice"), q.waiting("bob")) == (0, 1)
