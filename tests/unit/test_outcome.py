"""The terminal status decided from what the backend saw: a table."""

from __future__ import annotations

import pytest

from crucible_jupyter.backends.base import Outcome
from crucible_jupyter.dispatcher.outcome import NEVER_STARTED, decide
from crucible_jupyter.models import Status

ERR = {"ename": "ValueError", "evalue": "bad"}
KI = {"ename": "KeyboardInterrupt", "evalue": ""}


@pytest.mark.parametrize(
    ("outcome", "facts", "expected"),
    [
        (Outcome(0), {}, (Status.SUCCEEDED, None)),
        # what the dispatcher did wins over any exit
        (Outcome(0), {"cancelled": True}, (Status.CANCELLED, "cancelled by request")),
        (Outcome(137, signal=9), {"cancelled": True, "timed_out": True},
         (Status.CANCELLED, "cancelled by request")),
        (Outcome(None), {"timed_out": True, "timeout": 2.5},
         (Status.TIMED_OUT, "timed out after 2.5 s")),
        # a reason the orchestrator knows
        (Outcome(137, "memory limit exceeded"), {"last_error": ERR},
         (Status.FAILED, "memory limit exceeded")),
        # exit 0 without the runner's start frame: the cell never ran
        (Outcome(0), {"runner_started": False}, (Status.FAILED, NEVER_STARTED)),
        # an exception names itself; without a message, its name
        (Outcome(1), {"last_error": ERR}, (Status.FAILED, "ValueError: bad")),
        (Outcome(1), {"last_error": {"ename": "Boom", "evalue": ""}}, (Status.FAILED, "Boom")),
        (Outcome(130), {"last_error": KI}, (Status.FAILED, "KeyboardInterrupt")),
        # 130 with another error frame is not an interrupt: the exit code says it
        (Outcome(130), {"last_error": ERR}, (Status.FAILED, "exited with code 130")),
        # a signal only when the backend saw it; 137 alone is an exit code the cell chose
        (Outcome(137, signal=9), {}, (Status.FAILED, "killed by SIGKILL")),
        (Outcome(137), {}, (Status.FAILED, "exited with code 137")),
        (Outcome(200, signal=72), {}, (Status.FAILED, "exited with code 200")),  # no such signal
        (Outcome(3), {"last_error": ERR}, (Status.FAILED, "exited with code 3")),
        (Outcome(None), {}, (Status.FAILED, "exited with code None")),
    ],
)  # fmt: skip
def test_decide(outcome, facts, expected):
    assert decide(outcome, **facts) == expected


def test_a_long_exception_message_is_cut():
    status, reason = decide(Outcome(1), last_error={"ename": "E", "evalue": "x" * 2000})
    assert status is Status.FAILED
    assert reason == ("E: " + "x" * 2000)[:500]
