"""What a starting dispatcher does with the executions a dead one left unfinished.

A dispatcher can die anywhere (SIGKILL, a node lost). What it left is read back from
storage and decided here, from facts that are durable:

* ``queued``: nothing ran. It is queued again here (adopted).
* ``starting`` or ``running``, and the backend still has its sandbox (a Kubernetes Job or a
  claimed warm pod, running or already ended): it is followed again (resumed). A sandbox that
  ended while no dispatcher ran gives its real outcome and its whole output, read back from it.
* no sandbox, and it never **began**: it is queued again and runs now. The mark of a
  beginning is the record's ``isolation``, written only once the backend's start call
  returned a sandbox (``running`` and ``started_at`` come later still). A dispatcher that
  died before that, for example while a Job was being created, left a cell that never ran.
  A resumed execution that had not begun and whose sandbox ends without running the cell
  (a warm pod claimed for it, its cell never sent before the death) is queued again too.
* no sandbox, and it began: it ends ``failed`` with :data:`RESTARTED` (a local sandbox dies
  with its dispatcher; a Job can be deleted, by hand or by its TTL after a long outage).
  The output stored before the death is kept, and the terminal status follows it.

What the marker cannot tell: a sandbox created in the instant between the backend's call
returning and the marker being stored, and gone without a trace by the restart (a local
sandbox in that millisecond), counts as not begun and runs again; a Job whose creation
request was still in flight at the death may appear after the reattach looked for it (the
start of the requeued cell deletes a pod that carries its label before it starts its own).
"""

from __future__ import annotations

import enum
import os

from ..models import Execution, Status

#: Reason recorded on an execution that began and whose sandbox did not outlive its dispatcher.
RESTARTED = (
    "dispatcher restarted while the cell was running, and its sandbox did not survive it;"
    " the output stored until then is kept"
)


class Recovery(enum.Enum):
    """What becomes of one unfinished execution when a dispatcher starts."""

    ADOPT = "adopt"  # queued: queue it here
    RESUME = "resume"  # its sandbox is still there: follow it (to its real end)
    REQUEUE = "requeue"  # it never began: queue it again, it runs now
    FAIL = "fail"  # it began and its sandbox is gone: failed, with RESTARTED


def began(execution: Execution) -> bool:
    """Whether a sandbox was ever created for ``execution`` (stored ``isolation``, written
    once the backend's start returned; ``running`` and ``started_at`` come after it)."""
    return (
        execution.isolation is not None
        or execution.status is Status.RUNNING
        or execution.started_at is not None
    )


def after_restart(execution: Execution, reattached: bool) -> Recovery:
    """The decision for an unfinished ``execution`` a dead dispatcher left, given whether
    its backend found its sandbox (``reattached``)."""
    if execution.status is Status.QUEUED:
        return Recovery.ADOPT
    if reattached:
        return Recovery.RESUME
    return Recovery.FAIL if began(execution) else Recovery.REQUEUE


def owner_alive(owner: str | None) -> bool:
    """Whether the dispatcher ``host:pid`` may still be running (unknown hosts count as alive)."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != os.uname().nodename:
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True
