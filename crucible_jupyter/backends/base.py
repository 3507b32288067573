"""The contract every execution backend fulfils.

A backend turns one :class:`~crucible_jupyter.models.Execution` into something running
somewhere (a bubblewrap sandbox, a Kubernetes Job) and hands back a :class:`Sandbox`: the
runner's output as raw lines, and an :class:`Outcome` decided by the orchestrator (exit
code, OOM kill, limits), never by what user code printed.

Backends are chosen by short name through the registry (``registry.py``: the
``crucible_jupyter.backends`` entry point group), so a third party can add one without
forking; this contract knows none of them.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from traitlets import Integer
from traitlets.config import LoggingConfigurable

from ..models import Execution, ExecutionRequest

#: Where a raw line came from: the runner's frame channel, or raw stderr of the sandbox.
FRAMES = "frames"
STDERR = "stderr"


@dataclass
class Outcome:
    """How an execution ended, as the orchestrator saw it.

    ``exit_code`` is the process's exit status (128+N for a signal N). ``reason`` is a
    human-readable cause when the orchestrator knows one ("memory limit exceeded").
    ``signal`` is the signal that ended the cell (or its sandbox) when the backend knows it
    from something the cell cannot forge (the wait status of a process it spawned, the
    runner's report of the cell's wait status); never inferred from ``exit_code``, which a
    cell chooses (``SystemExit(137)``).
    """

    exit_code: int | None
    reason: str | None = None
    signal: int | None = None


def reported_signal(end: dict | None, code: Any) -> int | None:
    """The signal that ended the cell, as the runner's end frame ``end`` names it (the runner
    saw the cell's wait status; the cell cannot write frames), only if the sandbox's exit
    ``code`` agrees (128 + N). None when the cell exited, or nothing was reported: an exit code
    alone is never read as a signal, since a cell can exit with 137."""
    signum = (end or {}).get("signal")
    if isinstance(signum, int) and not isinstance(signum, bool) and code == 128 + signum:
        return signum
    return None


@dataclass
class Check:
    """One line of a health report: what was checked, whether it is fine, how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    severity: str = "error"  # "error" or "warning" when not ok

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
            "severity": self.severity,
        }


@dataclass
class Sandbox(abc.ABC):
    """A running execution. The dispatcher reads :meth:`lines` until they end, then :meth:`wait`."""

    isolation: str

    async def ready(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Return once the code has started running (or can never start: then
        :meth:`lines` ends at once and :meth:`wait` says why). Local sandboxes start at
        once; a pod may wait for scheduling and its image."""

    @abc.abstractmethod
    def lines(self) -> AsyncIterator[tuple[str, bytes, int]]:
        """Yield ``(FRAMES|STDERR, line, dropped)`` in arrival order until the output ends.

        A line longer than the backend's limit is cut and ``dropped`` counts the bytes cut
        from it (0 for whole lines), so memory stays bounded whatever the code prints.
        """

    @abc.abstractmethod
    async def wait(self) -> Outcome:
        """Wait for the sandbox to end and say how it ended; releases its resources."""

    @abc.abstractmethod
    async def interrupt(self) -> None:
        """Ask the user code to stop (KeyboardInterrupt); it may ignore the request."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """End everything in the sandbox at once. Safe to call more than once."""


class Backend(LoggingConfigurable):
    """Base class of backends: start an execution, report health, close."""

    #: short name used in configuration, requests and records
    name = "base"

    output_limit = Integer(
        None,
        allow_none=True,
        help="""Bytes of output the dispatcher keeps per execution (its ``output_limit``),
        handed over by whoever creates the backend: the runner writes no more output than
        that. None: not known (a backend made on its own, as the doctor and tests may).""",
    )

    def admit(self, request: ExecutionRequest) -> None:
        """Raise InvalidRequest (400) if this backend cannot run ``request`` as asked; called
        before the request is stored, so a request no backend can honour never queues."""

    @abc.abstractmethod
    async def start(self, execution: Execution) -> Sandbox:
        """Start ``execution``; raise a CrucibleError with a clear message if it cannot."""

    async def prepare(self) -> None:
        """Get ready so the first executions start fast (the dispatcher calls this once, in
        the background, when it starts scheduling). Optional."""

    async def checks(self) -> list[Check]:
        """What ``crucible doctor`` reports for this backend."""
        return []

    async def reattach(self, execution: Execution) -> Sandbox | None:
        """A handle on ``execution`` if it still runs after its dispatcher died.

        The new sandbox's :meth:`Sandbox.lines` replays the output from the start (the
        dispatcher skips what it stored). None when the backend cannot (a local sandbox
        dies with its dispatcher) or the execution is gone.
        """
        return None

    async def sweep(self, live: set[str]) -> int:
        """Remove what this backend still runs for executions not in ``live`` (orphans a
        crashed dispatcher left); returns how many. Only called by the sole dispatcher."""
        return 0

    async def close(self) -> None:
        """Release what the backend holds (connections, watches)."""


async def read_lines(
    reader: asyncio.StreamReader, max_line: int, chunk: int = 1 << 16
) -> AsyncGenerator[tuple[bytes, int], None]:
    """Yield complete lines (without the newline) from ``reader`` with bounded memory.

    A line longer than ``max_line`` is yielded cut to ``max_line`` bytes, and the number of
    bytes dropped from it is the second item (0 for whole lines). A last line without a
    newline is yielded at EOF.
    """
    buf = bytearray()
    dropping = 0  # >0 while skipping the rest of an overlong line
    while True:
        data = await reader.read(chunk)
        if not data:
            break
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                piece = data[start:]
                if dropping:
                    dropping += len(piece)
                else:
                    room = max_line - len(buf)
                    buf += piece[:room]
                    if len(piece) > room:
                        dropping = len(piece) - room
                break
            piece = data[start:nl]
            if dropping:
                yield bytes(buf), dropping + len(piece)
            else:
                room = max_line - len(buf)
                buf += piece[:room]
                yield bytes(buf), max(0, len(piece) - room)
            buf.clear()
            dropping = 0
            start = nl + 1
    if buf or dropping:
        yield bytes(buf), dropping
