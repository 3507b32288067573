"""The terminal status of an execution, decided from what the backend saw.

Pure: the same facts give the same status and reason, whatever the cell printed. The
facts are the backend's :class:`~crucible_jupyter.backends.base.Outcome` (exit code, a
reason the orchestrator knows, a signal it saw), what the dispatcher did (cancel, timeout),
whether the runner said it started the cell, and the cell's last error frame (which names an
exception, never decides a status on its own: a cell can write any text).
"""

from __future__ import annotations

import signal
from typing import Any

from ..backends.base import Outcome
from ..models import Status

#: Longest reason taken from an exception's name and message.
REASON_MAX = 500
NEVER_STARTED = "the sandbox ended without running the cell (its runner never started)"


def not_started_reason(timeout: float) -> str:
    """The reason of a cell whose sandbox did not start within its timeout (a pod waiting
    for room on a node, or for a quota): it timed out without running."""
    return (
        f"timed out after {timeout:g} s waiting for its sandbox to start; the cell never ran"
        " (the cluster may have no room for it now)"
    )


def decide(
    outcome: Outcome,
    *,
    cancelled: bool = False,
    timed_out: bool = False,
    timeout: float = 0.0,
    runner_started: bool = True,
    last_error: dict[str, Any] | None = None,
) -> tuple[Status, str | None]:
    """``(status, reason)`` of an ended execution. In order: a cancel, then a timeout
    (``timeout`` seconds) win; then a reason the backend knows (memory limit, eviction);
    exit 0 succeeds if the runner started the cell; exit 1 (or 130 after KeyboardInterrupt)
    with an error frame names the exception; a signal the backend saw names the signal;
    anything else says the exit code."""
    if cancelled:
        return Status.CANCELLED, "cancelled by request"
    if timed_out:
        return Status.TIMED_OUT, f"timed out after {timeout:g} s"
    if outcome.reason:
        return Status.FAILED, outcome.reason
    code = outcome.exit_code
    if code == 0:  # not started: e.g. a warm pod whose stdin closed before the cell came
        return (Status.SUCCEEDED, None) if runner_started else (Status.FAILED, NEVER_STARTED)
    err = last_error
    # the runner exits 1 after an exception, 130 after KeyboardInterrupt (raised or SIGINT)
    if err and (code == 1 or (code == 130 and err.get("ename") == "KeyboardInterrupt")):
        text = f"{err.get('ename')}: {err['evalue']}" if err.get("evalue") else err.get("ename")
        return Status.FAILED, str(text)[:REASON_MAX]
    if outcome.signal:  # known, never guessed from the code: a cell can exit with 137
        try:
            return Status.FAILED, f"killed by {signal.Signals(outcome.signal).name}"
        except ValueError:
            pass
    return Status.FAILED, f"exited with code {code}"
