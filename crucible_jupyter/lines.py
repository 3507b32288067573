"""The ``%crucible`` line commands: ``history``, ``status ID``, ``queue``.

Shared by the line magic (:mod:`crucible_jupyter.magic`) and the crucible kernel, which
answers a one-line ``%crucible ...`` cell itself. :func:`line_command` parses the line (the
grammar and help are in :mod:`crucible_jupyter.options`), asks the dispatcher, and returns an
object that shows itself: an HTML table or text in a notebook, text in a terminal.
"""

from __future__ import annotations

import html
import shlex
import time
from typing import Any

from IPython.core.error import UsageError

from .errors import CrucibleError, NotFound
from .options import HISTORY_HELP, LINE_USAGE, parse_history


def line_command(client: Any, line: str) -> Any:
    """Run one ``%crucible ...`` line (``client``: a callable returning the ThreadedClient).

    Shared by the line magic and the crucible kernel. Misuse and refusals by the dispatcher
    raise ``UsageError`` with one message.
    """
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise UsageError(f"%crucible: cannot read {line.strip()!r}: {str(e).lower()}") from None
    if not words:
        raise UsageError(LINE_USAGE)
    command, rest = words[0], words[1:]
    if command in ("-h", "--help", "help"):
        raise UsageError(LINE_USAGE)
    try:
        if command == "history":
            return _history(client, rest)
        if command == "status":
            if len(rest) != 1:
                raise UsageError("usage: %crucible status EXECUTION_ID  (ids: %crucible history)")
            return ExecutionSummary(client().call("get", rest[0]))
        if command == "queue":
            if rest:
                raise UsageError(f"%crucible queue takes no arguments (got {' '.join(rest)!r})")
            return QueueSummary(client().call("queue_status"))
    except NotFound as e:
        raise UsageError(
            f"crucible: no execution with id {rest[0]!r}; list recent ids with %crucible history"
            if command == "status"
            else f"crucible: {e}"
        ) from None
    except CrucibleError as e:
        raise UsageError(f"crucible: {e}") from None
    raise UsageError(f"unknown %crucible command {command!r}; {LINE_USAGE}")


def _history(client: Any, words: list[str]) -> Any:
    filters = parse_history(words)
    if filters is None:
        return Text(HISTORY_HELP)
    page = client().call("list", **filters)
    return HistoryTable(page["executions"])


def _seconds(execution: dict[str, Any]) -> str:
    ms = execution.get("duration_ms")
    return f"{ms / 1000:.2f} s" if isinstance(ms, (int, float)) else "-"


def _when(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


class HistoryTable:
    """Recorded executions as a table (HTML in notebooks, text in terminals)."""

    columns = ("id", "created", "user", "status", "duration", "notebook", "name/tags")

    def __init__(self, executions: list[dict[str, Any]]) -> None:
        self.executions = executions

    def rows(self) -> list[tuple[str, ...]]:
        """One tuple of display strings per execution."""
        out: list[tuple[str, ...]] = []
        for e in self.executions:
            nb = e.get("notebook") or {}
            label = e.get("name") or ", ".join(e.get("tags") or [])
            out.append(
                (
                    e["id"],
                    _when(e.get("created_at")),
                    str(e.get("user", "")),
                    str(e.get("status", "")),
                    _seconds(e),
                    str(nb.get("path") or ""),
                    label,
                )
            )
        return out

    def __repr__(self) -> str:
        rows = [self.columns, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.columns))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        return "\n".join(lines) if self.executions else "no executions recorded"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
            for row in self.rows()
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class ExecutionSummary:
    """One execution's record, readable (``%crucible status ID``)."""

    def __init__(self, execution: dict[str, Any]) -> None:
        self.execution = execution

    def __repr__(self) -> str:
        e = self.execution
        nb = e.get("notebook") or {}
        events = e.get("events") or []
        lines = [
            f"execution {e['id']}: {e.get('status')}"
            + (f" ({e['reason']})" if e.get("reason") else ""),
            f"  user {e.get('user')}, created {_when(e.get('created_at'))},"
            f" ran {_seconds(e)}, exit code {e.get('exit_code')}",
            f"  backend {e.get('backend')}, isolation {e.get('isolation')}",
        ]
        if any(nb.values()):
            lines.append(
                f"  notebook {nb.get('path')}, cell {nb.get('cell_id')},"
                f" kernel {nb.get('kernel_id')}"
            )
        outputs = [ev for ev in events if ev.get("type") != "status"]
        lines.append(f"  {len(outputs)} output event(s), {e.get('output_bytes', 0)} bytes")
        return "\n".join(lines)


class Text:
    """Text shown as it is (no quotes) as a cell's result."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class QueueSummary(dict):
    """The queue's status (``%crucible queue``): a dict, shown as one readable paragraph."""

    def __repr__(self) -> str:
        depth = self.get("depth") or {}
        waiting = ", ".join(f"{k} {v}" for k, v in depth.items())
        text = (
            f"queue: {self.get('queued', 0)} queued ({waiting}),"
            f" {self.get('running', 0)} running of {self.get('capacity', '?')}"
        )
        if self.get("per_user_limit"):
            text += f", at most {self['per_user_limit']} running per user"
        return text

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))
