"""``%%crucible``: run one cell as an isolated, recorded execution and show its output live.

Load with ``%load_ext crucible_jupyter``. Inside a notebook served by a Jupyter server with the
``crucible`` extension, cells go to that server's dispatcher with no configuration (the server
hands its kernels ``CRUCIBLE_SERVER_URL`` and ``CRUCIBLE_TOKEN``); in plain IPython an
in-process dispatcher is started on first use.

Promises of ``%%crucible [options]``:

- stdout and stderr appear as they are produced (stderr as stderr), rich display data through
  IPython's display machinery unchanged, the cell's result as its ``Out``;
- one status line, updated in place: queued (position N) → running, elapsed → finished in X s,
  with the execution id;
- a cell that does not succeed raises :class:`RemoteExecutionError` showing the remote
  traceback, so "Run all" stops there;
- interrupting the kernel cancels the remote execution (recorded ``cancelled``) and raises
  ``KeyboardInterrupt``;
- the notebook path, cell id and kernel id are recorded when the kernel knows them.

Line magic: ``%crucible history [-n N] [--status S] [--tag T]``, ``%crucible status ID``,
``%crucible queue``.
"""

from __future__ import annotations

import html
import os
import sys
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import clear_output, display, publish_display_data

from .client import ThreadedClient, client_from_env, current_kernel_id, is_terminal
from .errors import Conflict, CrucibleError, InvalidRequest, Unavailable

_ICONS = {"succeeded": "✔", "failed": "✘", "timed_out": "⏱", "cancelled": "■"}


class RemoteExecutionError(Exception):
    """The cell ran in crucible and did not succeed; shows the remote traceback.

    ``status`` is the terminal state (``failed``, ``timed_out``, ``cancelled``), ``ename`` /
    ``evalue`` / ``remote_traceback`` come from the cell's error (when it raised), ``reason``
    from the dispatcher (for example "memory limit exceeded").
    """

    def __init__(
        self,
        execution_id: str,
        status: str,
        *,
        reason: str | None = None,
        ename: str | None = None,
        evalue: str | None = None,
        traceback: list[str] | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.status = status
        self.reason = reason
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = list(traceback or [])
        if ename:
            summary = f"{ename}: {evalue}" if evalue else ename
        else:
            summary = status.replace("_", " ") + (f": {reason}" if reason else "")
        super().__init__(f"{summary} (crucible execution {execution_id})")

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of the local stack: the cell's own traceback."""
        lines = list(self.remote_traceback) or [f"{type(self).__name__}: {self}"]
        if self.remote_traceback:
            lines.append(f"(crucible execution {self.execution_id}, {self.status})")
        return lines


class MimeBundle:
    """The cell's ``execute_result``, handed to IPython unchanged so it becomes ``Out[n]``."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<crucible result>"))


class StatusLine:
    """The one status line of a cell, updated in place through a display id."""

    def __init__(self, live: bool) -> None:
        self.live = live  # a frontend that can update in place (a kernel), not a terminal
        self.handle: Any = None
        self.text = ""

    def show(self, text: str, *, force: bool = False) -> None:
        """Show ``text``; in a terminal only when it says something new."""
        if text == self.text and not force:
            return
        changed_state = text.split(" · ")[:2] != self.text.split(" · ")[:2]
        self.text = text
        bundle = {
            "text/plain": text,
            "text/html": '<div class="crucible-status" style="font-family:monospace;'
            f'font-size:85%;opacity:.8">{html.escape(text)}</div>',
        }
        if self.handle is None or force:
            self.handle = display(bundle, raw=True, display_id=True)
        elif self.live:
            self.handle.update(bundle, raw=True)
        elif changed_state:
            print(text)


@magics_class
class CrucibleMagics(Magics):
    """The ``%%crucible`` cell magic and the ``%crucible`` line magic."""

    def __init__(self, shell: Any, client: ThreadedClient | None = None) -> None:
        super().__init__(shell)
        self._client = client

    @property
    def client(self) -> ThreadedClient:
        """The dispatcher client: this kernel's Jupyter server, or an embedded dispatcher."""
        if self._client is None:
            self._client = ThreadedClient(client_from_env())
        return self._client

    def close(self) -> None:
        """Release the client (stopping an embedded dispatcher)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- where the cell comes from ---------------------------------------------------------

    def notebook_ref(self) -> dict[str, str]:
        """Notebook path, cell id and kernel id, as far as this kernel knows them."""
        ref: dict[str, str] = {}
        path = os.environ.get("JPY_SESSION_NAME")
        if path:
            ref["path"] = path
        kernel = getattr(self.shell, "kernel", None)
        if kernel is not None:
            try:
                parent = kernel.get_parent() or {}
                cell_id = (parent.get("metadata") or {}).get("cellId")
                if isinstance(cell_id, str) and cell_id:
                    ref["cell_id"] = cell_id
            except Exception:
                pass
            kernel_id = current_kernel_id()
            if kernel_id:
                ref["kernel_id"] = kernel_id
        return ref

    # -- %%crucible ----------------------------------------------------------------------------

    @magic_arguments()
    @argument("--timeout", type=float, help="Wall-clock limit in seconds.")
    @argument("--priority", choices=["high", "normal", "low"], help="Scheduling priority.")
    @argument("--cpu", help="CPU cores, e.g. 0.5 or 500m.")
    @argument("--memory", help="Memory limit, e.g. 512Mi or 2Gi.")
    @argument("--image", help="Container image (Kubernetes backend).")
    @argument("--backend", help="Backend name, e.g. local or kubernetes.")
    @argument("--tag", action="append", default=[], help="Tag the execution (repeatable).")
    @argument("--name", help="A name for the execution, shown in the history.")
    @cell_magic("crucible")
    def crucible_cell(self, line: str, cell: str) -> Any:
        """Run this cell as an isolated, recorded crucible execution (fresh process, no state
        shared with the kernel); output streams into the cell as it is produced."""
        args = parse_argstring(self.crucible_cell, line)
        request: dict[str, Any] = {"code": cell}
        for key in ("timeout", "priority", "cpu", "memory", "image", "backend", "name"):
            value = getattr(args, key)
            if value is not None:
                request[key] = value
        if args.tag:
            request["tags"] = args.tag
        notebook = self.notebook_ref()
        if notebook:
            request["notebook"] = notebook
        return self.run(request)

    def run(self, request: dict[str, Any]) -> Any:
        """Submit ``request``, relay its events into the cell, raise unless it succeeded."""
        status = StatusLine(live=getattr(self.shell, "kernel", None) is not None)
        status.show("crucible · submitting")
        try:
            execution = self.client.call("submit", request)
        except (InvalidRequest, Unavailable) as e:
            status.show(f"crucible · refused · {e}")
            raise UsageError(f"crucible: {e}") from None
        relay = _Relay(execution["id"], status, self.client)
        try:
            for event in self.client.events(execution["id"]):
                relay.handle(event)
        except KeyboardInterrupt:
            relay.interrupted()
            raise
        except CrucibleError as e:  # the server went away mid-cell
            status.show(f"crucible · lost track of {execution['id']}: {e}")
            raise UsageError(
                f"crucible: lost the stream of execution {execution['id']} ({e});"
                f" see %crucible status {execution['id']}"
            ) from None
        return relay.finish()

    # -- %crucible -----------------------------------------------------------------------------

    @line_magic("crucible")
    def crucible_line(self, line: str) -> Any:
        """``%crucible history [-n N] [--status S] [--tag T]`` · ``%crucible status ID`` ·
        ``%crucible queue``: look at recorded executions and the queue."""
        words = line.split()
        if not words:
            raise UsageError(
                "usage: %crucible history [-n N] [--status S] [--tag T] | status ID | queue"
                "  (and %%crucible [options] to run a cell)"
            )
        command, rest = words[0], words[1:]
        try:
            if command == "history":
                return self._history(rest)
            if command == "status":
                if len(rest) != 1:
                    raise UsageError("usage: %crucible status EXECUTION_ID")
                return self._status(rest[0])
            if command == "queue":
                return self.client.call("queue_status")
        except CrucibleError as e:
            raise UsageError(f"crucible: {e}") from None
        raise UsageError(f"unknown %crucible command {command!r}: use history, status or queue")

    def _history(self, words: list[str]) -> Any:
        import argparse

        parser = argparse.ArgumentParser(prog="%crucible history", add_help=False)
        parser.add_argument("-n", "--limit", type=int, default=10)
        parser.add_argument("--status")
        parser.add_argument("--tag")
        parser.add_argument("--user")
        try:
            opts = parser.parse_args(words)
        except SystemExit:
            raise UsageError(parser.format_usage()) from None
        filters = {k: v for k, v in vars(opts).items() if v is not None}
        page = self.client.call("list", **filters)
        return HistoryTable(page["executions"])

    def _status(self, execution_id: str) -> Any:
        execution = self.client.call("get", execution_id)
        return ExecutionSummary(execution)


class _Relay:
    """Turns one execution's events into cell output and a status line."""

    def __init__(self, execution_id: str, status: StatusLine, client: ThreadedClient) -> None:
        self.id = execution_id
        self.status = status
        self.client = client
        self.last_seq = -1
        self._position_checked = time.monotonic()
        self.state = "queued"
        self.position: int | None = None
        self.running_since: float | None = None
        self.t_running: int | None = None
        self.t_end: int | None = None
        self.reason: str | None = None
        self.result: MimeBundle | None = None
        self.error: dict[str, Any] | None = None
        self.terminal = False
        self._render()

    def _render(self) -> None:
        short = self.id
        if self.terminal:
            secs = (self.t_end - self.t_running) / 1000 if self.t_running and self.t_end else None
            took = f" in {secs:.2f} s" if secs is not None else ""
            why = f" ({self.reason})" if self.reason and self.state != "succeeded" else ""
            icon = _ICONS.get(self.state, "")
            text = f"crucible · {icon} {self.state.replace('_', ' ')}{took}{why} · {short}"
        elif self.state == "running" and self.running_since is not None:
            text = f"crucible · running · {time.monotonic() - self.running_since:.0f} s · {short}"
        elif self.state == "queued" and self.position is not None:
            text = f"crucible · queued at position {self.position} · {short}"
        else:
            text = f"crucible · {self.state} · {short}"
        self.status.show(text)

    def handle(self, event: dict[str, Any] | None) -> None:
        """Show one event (``None``: nothing new, refresh the clock)."""
        if event is None:
            if self.state == "queued" and time.monotonic() - self._position_checked > 1:
                self._position_checked = time.monotonic()
                try:
                    position = self.client.call("queue_status", self.id, timeout=5).get("position")
                except Exception:
                    position = None
                if position is not None:
                    self.position = position
            self._render()
            return
        if isinstance(event.get("seq"), int):
            self.last_seq = max(self.last_seq, event["seq"])
        kind = event.get("type")
        if kind == "status":
            self.state = event.get("status", self.state)
            if event.get("position") is not None:
                self.position = event["position"]
            if self.state == "running" and self.running_since is None:
                self.running_since = time.monotonic()
                self.t_running = event.get("t")
            if is_terminal(event):
                self.terminal = True
                self.t_end = event.get("t")
                self.reason = event.get("reason")
                if self.t_running is None:
                    self.t_running = self.t_end
            self._render()
        elif kind == "stream":
            out = sys.stderr if event.get("name") == "stderr" else sys.stdout
            out.write(event.get("text", ""))
            out.flush()
        elif kind == "display_data":
            _flush_streams()
            publish_display_data(
                data=event.get("data") or {},
                metadata=event.get("metadata") or {},
                transient=event.get("transient") or None,
            )
        elif kind == "update_display_data":
            _flush_streams()
            publish_display_data(
                data=event.get("data") or {},
                metadata=event.get("metadata") or {},
                transient=event.get("transient") or None,
                update=True,
            )
        elif kind == "execute_result":
            self.result = MimeBundle(event.get("data") or {}, event.get("metadata"))
        elif kind == "error":
            self.error = event
        elif kind == "clear_output":
            _flush_streams()
            clear_output(wait=bool(event.get("wait")))
            self.status.show(self.status.text, force=True)

    def interrupted(self) -> None:
        """Cancel the remote execution and show what it did until it ended (bounded)."""
        _flush_streams()
        client = self.client
        try:
            client.call("cancel", self.id, timeout=15)
        except Conflict:
            pass
        except Exception as e:  # still raise KeyboardInterrupt; say why the cancel failed
            print(f"crucible: could not cancel {self.id}: {e}", file=sys.stderr)
            return
        deadline = time.monotonic() + 15
        try:
            for event in client.events(self.id, after=self.last_seq, tick=0.2):
                if event is not None:
                    self.handle(event)
                if self.terminal or time.monotonic() > deadline:
                    break
        except Exception:
            pass

    def finish(self) -> Any:
        """The cell's result when it succeeded; else raise RemoteExecutionError."""
        _flush_streams()
        if self.state == "succeeded":
            return self.result
        err = self.error or {}
        raise RemoteExecutionError(
            self.id,
            self.state,
            reason=self.reason,
            ename=err.get("ename"),
            evalue=err.get("evalue"),
            traceback=err.get("traceback"),
        )


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


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
        out = []
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


_MAGICS_ATTR = "_crucible_magics"


def load_ipython_extension(ipython: Any) -> None:
    """Register the crucible magics in ``ipython`` (idempotent)."""
    if getattr(ipython, _MAGICS_ATTR, None) is None:
        magics = CrucibleMagics(ipython)
        ipython.register_magics(magics)
        setattr(ipython, _MAGICS_ATTR, magics)


def unload_ipython_extension(ipython: Any) -> None:
    """Close the client (and an embedded dispatcher) of the crucible magics."""
    magics = getattr(ipython, _MAGICS_ATTR, None)
    if magics is not None:
        magics.close()
        setattr(ipython, _MAGICS_ATTR, None)
