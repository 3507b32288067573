"""Turn raw runner lines into event payloads, trusting nothing in them.

The runner writes one JSON object per line. User code may write anything, so each line is
checked: a known frame type with fields of the right types becomes an event payload; any
other line (a crash before the runner started, forged junk) is kept as raw stderr text.
Lifecycle frames (``start``, ``end``) are dropped: the dispatcher decides status itself.
Rich output (``display_data``, ``update_display_data``, ``execute_result``) leaves here
already cleaned by :func:`crucible_jupyter.output_policy.clean_output`: nothing a browser
could run is stored or sent to anyone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..output_policy import clean_output

OUTPUT_TYPES = (
    "stream",
    "display_data",
    "update_display_data",
    "execute_result",
    "error",
    "clear_output",
)
IGNORED_TYPES = ("start", "end")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _clean(text: str) -> str:
    """Text that is always valid UTF-8 (lone surrogates become visible escapes)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bundle(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(k, str)}


def raw_stderr(line: bytes) -> tuple[str, dict[str, Any]]:
    """A line that is not a frame, as stderr text."""
    return "stream", {"name": "stderr", "text": line.decode("utf-8", "replace") + "\n"}


def runner_dropped(line: bytes) -> int:
    """The bytes of output the runner dropped past its ``--output-limit``, as its ``end``
    frame reports them (0 for any other line, or a value that is not a plain count)."""
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        return 0
    if not isinstance(frame, dict) or frame.get("type") != "end":
        return 0
    value = frame.get("dropped_bytes")
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return min(max(value, 0), 1 << 62)


def parse(line: bytes, trusted: Iterable[str] = ()) -> tuple[str, dict[str, Any]] | None:
    """``(type, payload)`` for one runner line, or None for a frame to ignore.

    ``trusted``: MIME types the output policy passes unchanged (the operator's setting).
    """
    if not line.strip():
        return None
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        return raw_stderr(line)
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        return raw_stderr(line)
    kind = frame["type"]
    if kind in IGNORED_TYPES:
        return None
    if kind == "stream":
        name = frame.get("name")
        return kind, {
            "name": name if name in ("stdout", "stderr") else "stdout",
            "text": _clean(_text(frame.get("text"))),
        }
    if kind in ("display_data", "update_display_data", "execute_result"):
        payload = {"data": _bundle(frame.get("data")), "metadata": _bundle(frame.get("metadata"))}
        transient = frame.get("transient")
        if isinstance(transient, dict):
            payload["transient"] = transient
        if kind == "update_display_data" and not (
            isinstance(transient, dict) and isinstance(transient.get("display_id"), str)
        ):
            kind = "display_data"  # an update needs the display id it replaces
        return kind, clean_output(kind, payload, trusted)
    if kind == "error":
        tb = frame.get("traceback")
        return kind, {
            "ename": _clean(_text(frame.get("ename"))) or "Error",
            "evalue": _clean(_text(frame.get("evalue"))),
            "traceback": [_clean(x) for x in tb if isinstance(x, str)]
            if isinstance(tb, list)
            else [],
        }
    if kind == "clear_output":
        return kind, {"wait": bool(frame.get("wait", False))}
    return raw_stderr(line)
