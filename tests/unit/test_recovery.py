"""The decision a starting dispatcher makes for each execution a dead one left unfinished."""

from __future__ import annotations

import os
import subprocess

import pytest

from crucible_jupyter.dispatcher.recovery import Recovery, after_restart, began, owner_alive
from crucible_jupyter.models import Execution, ExecutionRequest, Status


def _left(status: Status, isolation: str | None = None, started_at: int | None = None):
    return Execution(
        id="01a20000-0000-7000-8000-000000000001",
        request=ExecutionRequest(code="print(1)"),
        status=status,
        isolation=isolation,
        started_at=started_at,
    )


@pytest.mark.parametrize(
    ("status", "isolation", "started_at", "reattached", "expected"),
    [
        # queued: nothing ran; whatever the backend says, it is queued here
        (Status.QUEUED, None, None, False, Recovery.ADOPT),
        # starting, no sandbox was ever created (died before or during the backend's start)
        (Status.STARTING, None, None, False, Recovery.REQUEUE),
        # starting, its Job was created (the marker) and is still there: follow it
        (Status.STARTING, "kubernetes", None, True, Recovery.RESUME),
        # starting, the Job's creation returned just before the death (no marker yet) and the
        # Job is there: followed, not started again
        (Status.STARTING, None, None, True, Recovery.RESUME),
        # starting, created, and gone by the restart (deleted; its TTL after a long outage)
        (Status.STARTING, "kubernetes", None, False, Recovery.FAIL),
        # running: it began; followed if its sandbox is there, failed with a reason if not
        (Status.RUNNING, "kubernetes+warm", 1, True, Recovery.RESUME),
        (Status.RUNNING, "bubblewrap", 1, False, Recovery.FAIL),
        # a record from before the marker: running counts as begun
        (Status.RUNNING, None, None, False, Recovery.FAIL),
        (Status.STARTING, None, 1, False, Recovery.FAIL),
    ],
)
def test_after_restart(status, isolation, started_at, reattached, expected):
    assert after_restart(_left(status, isolation, started_at), reattached) is expected


def test_began_needs_the_marker_or_a_start():
    assert not began(_left(Status.STARTING))
    assert began(_left(Status.STARTING, isolation="bubblewrap"))
    assert began(_left(Status.RUNNING))


def test_owner_alive():
    proc = subprocess.Popen(["true"])
    proc.wait()
    host = os.uname().nodename
    assert owner_alive(f"{host}:{os.getpid()}")
    assert not owner_alive(f"{host}:{proc.pid}")
    assert owner_alive("another-host:1")  # cannot be checked from here: left alone
    assert not owner_alive(None)
    assert not owner_alive("no-pid")
