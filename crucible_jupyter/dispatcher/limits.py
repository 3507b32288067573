"""The output limit of one execution: which frames are kept, which dropped, and the count.

Pure book-keeping (no I/O), fed one frame at a time by the dispatcher's output pump:

* Up to ``limit`` bytes of output are kept (a frame counts its bytes on the wire plus its
  newline). The frame that crosses the limit keeps, if it is stream text, the head that fits;
  everything after it is dropped (what fits later would show out of context), and the user
  is told once (:data:`LIMIT_NOTICE`).
* Error frames (the traceback that names the failure) pass the limit, up to
  :data:`ERROR_ROOM` bytes more: a cell can send any number of them.
* What is dropped is counted (``dropped``), with what the backend cut from overlong lines and
  what the runner itself dropped at the limit, and marks the execution ``truncated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Bytes of error frames kept beyond the output limit. Bounded: a cell can send any number of
#: error frames, which would otherwise all be stored.
ERROR_ROOM = 1 << 20
LIMIT_NOTICE = "output limit of {} reached; further output is dropped (an error is still shown)"

Frame = tuple[str, dict[str, Any]]  # (type, data) as frames.parse returns it


def fit_stream(parsed: Frame, size: int, room: int) -> tuple[dict[str, Any], int] | None:
    """The head of a stream frame (``size`` bytes on the wire) that fits in ``room`` bytes,
    and the bytes it counts for; None when it is not stream text or nothing fits."""
    kind, data = parsed
    if kind != "stream":
        return None
    text = data["text"].encode("utf-8")
    overhead = size - len(text)  # the frame's fields (and any JSON escaping) around the text
    head = text[: room - overhead].decode("utf-8", "ignore") if room > overhead else ""
    if not head:
        return None
    return {**data, "text": head}, overhead + len(head.encode("utf-8"))


@dataclass
class OutputBudget:
    """What one execution has kept and dropped of its output, against ``limit`` bytes."""

    limit: int
    kept: int = 0  # bytes of output kept (the execution's output_bytes)
    dropped: int = 0  # bytes dropped (dropped_bytes)
    truncated: bool = False  # anything was dropped
    cut: bool = False  # the limit was reached: later frames are dropped, errors excepted

    def lost(self, nbytes: int) -> None:
        """Count ``nbytes`` dropped before they reached the dispatcher (an overlong line the
        backend cut, what the runner dropped at the limit)."""
        self.truncated = True
        self.dropped += nbytes

    def skips_unparsed(self, size: int, may_be_error: bool) -> bool:
        """Whether a frame of ``size`` bytes is dropped without being parsed: once cut, any
        frame that cannot be an error (``may_be_error``: it holds the error marker)."""
        if self.cut and not may_be_error:
            self.dropped += size
            return True
        return False

    def admit(self, frame: Frame, size: int) -> tuple[Frame | None, bool]:
        """Account for a parsed ``frame`` of ``size`` bytes: ``(what to publish or None,
        whether the limit notice is due now)``. The notice is due once: when the limit is
        first reached (then :attr:`cut` is set)."""
        kind = frame[0]
        if kind == "error":
            if self.kept + size > self.limit + ERROR_ROOM:  # a flood of errors: bounded too
                self.truncated = True
                self.dropped += size
                return None, self._cut()
            self.kept += size
            return frame, False
        if self.cut:  # not an error (it only quoted the marker, e.g. a display of a dict)
            self.dropped += size
            return None, False
        if self.kept + size > self.limit:  # crosses the limit: stream text keeps what fits
            head = fit_stream(frame, size, self.limit - self.kept)
            self.truncated = True
            self.dropped += size - (head[1] if head else 0)
            if head is None:
                return None, self._cut()
            self.kept += head[1]
            return ("stream", head[0]), self._cut()
        self.kept += size
        return frame, False

    def _cut(self) -> bool:
        first = not self.cut
        self.cut = True
        return first
