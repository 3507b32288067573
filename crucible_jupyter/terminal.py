"""What the ``crucible`` command writes, made safe against the cell that produced it.

Two promises, for every subcommand that shows a cell's text (its output, traceback, reason,
name, code):

* **A cell's text cannot drive the reader's terminal.** Written to a terminal, every character
  that could act on it instead of being shown — C0 controls but newline and tab (ESC starts
  the OSC 52 clipboard, OSC 0 title, SGR 8 conceal and cursor-movement sequences), DEL, the C1
  controls U+0080–U+009F (8-bit CSI and OSC), and the bidirectional overrides, isolates and
  marks (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F, U+061C: "Trojan Source" reordering) — is
  shown escaped, as ``\\x1b`` or ``\\u202e``. A carriage return in a cell's *stream* text is
  kept (progress bars redraw their line with it): it only returns to the start of the current
  line, which is always the cell's own text, since crucible starts each of its lines on a
  fresh one. Written to a pipe or a file, a cell's output is passed exactly as it was printed
  (a file holds what the cell wrote; whoever prints it later chooses how); ``--json`` is
  exact everywhere, and safe on a terminal (:func:`dumps`).
* **crucible's own lines cannot be forged on a terminal.** They always start on a line of
  their own, and on a terminal they are bold (the final status green or red, unless
  ``NO_COLOR`` is set): a cell can print ``[crucible] succeeded``, but only as plain text,
  since every escape sequence it writes is shown, not obeyed. Where stderr is not a
  terminal, the exit status (or ``--json``) is what a program should trust.

:class:`Output` also keeps a terminal or pipe that does not keep up from blocking the caller:
see there.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import threading
import time
from collections import deque
from typing import Any

from .models import format_bytes

#: Bidirectional overrides, embeddings, isolates and marks (a regex character class body).
BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
#: Characters a cell's text may not send raw to a terminal (newline and tab may).
UNSAFE = f"\x00-\x08\x0b-\x1f\x7f-\x9f{BIDI}"
_UNSAFE = re.compile(f"[{UNSAFE}]")
_UNSAFE_BUT_CR = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{BIDI}]")

#: Seconds ``crucible run`` waits, once the cell has ended, for a terminal or pipe that takes
#: none of the output still buffered; then it gives up on it (``crucible show`` has it).
DRAIN_STALL_SECONDS = 10.0

#: Bytes ``crucible run`` holds for a terminal or pipe that does not keep up; past it, output
#: is dropped (and counted, and said) rather than held or waited for.
BUFFER_LIMIT = 1 << 20


def _shown(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str, *, keep_cr: bool = False) -> str:
    """``text`` with every character of :data:`UNSAFE` shown as its escape (``\\x1b``,
    ``\\u202e``), so that printing it cannot drive a terminal; ``keep_cr`` leaves carriage
    returns as they are (a cell's stream text: progress bars)."""
    return (_UNSAFE_BUT_CR if keep_cr else _UNSAFE).sub(_shown, text)


def dumps(value: Any) -> str:
    """``value`` as one line of JSON that is safe on a terminal and exact once parsed: every
    character of :data:`UNSAFE` is written as a ``\\uXXXX`` escape (``json.dumps`` leaves
    DEL raw)."""
    return json.dumps(value).replace("\x7f", "\\u007f")


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


_NOTICE_ROOM = 256  # bytes kept for the notice that says output was dropped
_STYLES = {"ok": "\x1b[1;32m", "bad": "\x1b[1;31m", None: "\x1b[1m"}
_RESET = "\x1b[0m"


class _Lane:
    """What waits to be written to one file (stdout and stderr share a lane when they are
    the same file, so their order is kept), and the daemon thread that writes it."""

    def __init__(self, cond: threading.Condition, background: bool) -> None:
        self.cond = cond
        self.items: deque[tuple[int, bytes]] = deque()
        self.buffered = 0  # bytes in items and in the write under way
        self.dropped = 0  # bytes dropped since the last notice
        self.at_line_start = True
        self.dead = False  # its reader went away (EPIPE, EIO): what is left goes nowhere
        self.moved = time.monotonic()  # the last time a write made progress
        if background:
            threading.Thread(target=self._drain, name="crucible-output", daemon=True).start()

    def write(self, fd: int, data: bytes) -> None:
        """Write all of ``data`` to ``fd``, blocking; on an error the lane is dead."""
        view = memoryview(data)
        while view and not self.dead:
            try:
                n = os.write(fd, view)
            except BlockingIOError:  # someone made the file non-blocking: wait for room
                select.select([], [fd], [], 1)
                continue
            except InterruptedError:
                continue
            except OSError:  # EPIPE, EIO (the terminal went away), EBADF...
                self.dead = True
                return
            view = view[n:]
            self.moved = time.monotonic()

    def _drain(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                fd, data = self.items[0]
            self.write(fd, data)
            with self.cond:
                self.items.popleft()
                self.buffered -= len(data)
                if self.dead:
                    self.items.clear()
                    self.buffered = 0
                self.cond.notify_all()


class Output:
    """The command's stdout and stderr, with a cell's text escaped where it reaches a terminal.

    With ``background=True`` (``crucible run``) nothing the caller writes can block it — the
    caller is the event loop that enforces the cell's timeout. A daemon thread per file
    writes what it is given, in order, from a buffer of at most ``limit`` bytes; a write that
    does not fit (a pipe nobody reads, a terminal paused with Ctrl-S) is dropped and counted,
    and where that output resumes, and at the end, a line on stderr says how much was not
    shown and where to see it. crucible's own lines are never dropped (there are few of
    them). :meth:`close` waits for the rest while the reader takes some, and gives up on a
    file that took nothing for ``stall`` seconds. Without ``background`` every write is made
    at once, blocking (``crucible show``).
    """

    def __init__(
        self,
        out: int = 1,
        err: int = 2,
        *,
        background: bool = False,
        limit: int = BUFFER_LIMIT,
        colour: bool | None = None,
    ) -> None:
        self.fds = {"stdout": out, "stderr": err}
        self.tty = {out: _isatty(out), err: _isatty(err)}
        self.encoding = {
            out: getattr(sys.stdout, "encoding", None) or "utf-8",
            err: getattr(sys.stderr, "encoding", None) or "utf-8",
        }
        self.colour = (not os.environ.get("NO_COLOR")) if colour is None else colour
        #: where to see everything, named in the "not shown" notices (``crucible show ID``)
        self.hint = ""
        self.background = background
        self.limit = limit
        self._cond = threading.Condition()
        lane = _Lane(self._cond, background)
        shared = _same_file(out, err)  # one lane: their order is kept
        self._lanes = {out: lane, err: lane if shared else _Lane(self._cond, background)}

    # -- what callers write ------------------------------------------------------------------

    def cell(self, stream: str, text: str, *, keep_cr: bool = False) -> None:
        """A cell's text on ``stream`` ("stdout" or "stderr"): escaped if that is a terminal,
        exact otherwise; dropped (and counted) when a background buffer is full."""
        fd = self.fds[stream]
        if self.tty[fd]:
            text = escape(text, keep_cr=keep_cr)
        self._put(fd, text)

    def text(self, text: str) -> None:
        """crucible's own text on stdout (``show``'s record): the values in it that came from a
        cell are escaped on a terminal."""
        fd = self.fds["stdout"]
        self._put(fd, escape(text) if self.tty[fd] else text)

    def json(self, text: str) -> None:
        """One JSON document (from :func:`dumps`) on stdout, as it is, on a line of its own;
        dropped whole, never cut, when the buffer is full."""
        self._put(self.fds["stdout"], text + "\n")

    def line(self, text: str, *, tone: str | None = None) -> None:
        """One line of crucible's own on stderr: ``[crucible] text``, on a line of its own,
        always escaped (it may quote a cell: a reason, a MIME type), bold on a terminal and
        green (``tone="ok"``) or red (``"bad"``) unless ``NO_COLOR``; never dropped."""
        with self._cond:
            self._line_locked(text, tone)

    # -- the buffers ---------------------------------------------------------------------------

    def _line_locked(self, text: str, tone: str | None = None) -> None:
        fd = self.fds["stderr"]
        body = f"[crucible] {escape(text)}"
        if self.tty[fd]:
            body = f"{_STYLES[tone if self.colour else None]}{body}{_RESET}"
        if not self._lanes[fd].at_line_start:
            body = "\n" + body
        self._queue_locked(fd, body + "\n")

    def _put(self, fd: int, text: str) -> None:
        lane = self._lanes[fd]
        with self._cond:
            data = text.encode(self.encoding[fd], "backslashreplace")
            if not data:
                return
            if self.background:
                room = len(data) + (_NOTICE_ROOM if lane.dropped else 0)
                if lane.buffered + room > self.limit:
                    lane.dropped += len(data)
                    return
                if lane.dropped:  # output resumes after a gap: say so where the gap is
                    self._notice_locked(lane)
            self._queue_locked(fd, text, data)

    def _queue_locked(self, fd: int, text: str, data: bytes | None = None) -> None:
        lane = self._lanes[fd]
        if data is None:
            data = text.encode(self.encoding[fd], "backslashreplace")
        lane.at_line_start = text.endswith("\n")
        if lane.dead:
            return
        if not self.background:
            lane.write(fd, data)
            return
        lane.items.append((fd, data))
        lane.buffered += len(data)
        self._cond.notify_all()

    def _notice_locked(self, lane: _Lane) -> None:
        where = f"; see `crucible show {self.hint}`" if self.hint else ""
        dropped, lane.dropped = lane.dropped, 0
        self._line_locked(
            f"{format_bytes(dropped)} of output were not shown here: the terminal or pipe did"
            f" not keep up{where}"
        )

    def close(self, stall: float | None = DRAIN_STALL_SECONDS) -> None:
        """Say what was dropped, then wait until everything is written — or give up on a file
        that took nothing for ``stall`` seconds, and say so on stderr (best effort: stderr
        may be that same file)."""
        if not self.background:
            return
        lanes = list(dict.fromkeys(self._lanes.values()))
        with self._cond:
            for lane in lanes:
                if lane.dropped:
                    self._notice_locked(lane)
            now = time.monotonic()
            for lane in lanes:
                lane.moved = max(lane.moved, now)
            while True:
                waiting = [
                    lane
                    for lane in lanes
                    if lane.buffered and (stall is None or time.monotonic() - lane.moved < stall)
                ]
                if not waiting:
                    break
                self._cond.wait(0.2)
            left = sum(lane.buffered for lane in lanes)
        if not left:
            return
        where = f"; see `crucible show {self.hint}`" if self.hint else ""
        message = (
            f"\n[crucible] {format_bytes(left)} of output were not shown: the terminal or pipe"
            f" took none of it for {stall:g} s{where}\n"
        ).encode()
        writer = threading.Thread(
            target=os.write, args=(self.fds["stderr"], message), name="crucible-notice",
            daemon=True,
        )  # fmt: skip
        writer.start()
        writer.join(1)
