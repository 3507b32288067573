"""``%%crucible``: run one cell as an isolated, recorded execution and show its output live.

Load with ``%load_ext crucible_jupyter``. Inside a notebook served by a Jupyter server with the
``crucible`` extension, cells go to that server's dispatcher with no configuration (the server
hands its kernels ``CRUCIBLE_SERVER_URL`` and ``CRUCIBLE_TOKEN``); in plain IPython an
in-process dispatcher is started on first use.

Promises of ``%%crucible [options]``:

- stdout and stderr appear as they are produced (stderr as stderr), rich display data through
  IPython's display machinery, the cell's result as its ``Out``; rich output passes the
  output policy (:func:`crucible_jupyter.output_policy.clean_output`) once more just before
  it is shown, whatever server sent it: nothing in it can run in the browser;
- one status line, updated in place: queued (position N) → running, elapsed → finished in X s,
  with the execution id;
- a cell that does not succeed raises :class:`RemoteExecutionError` showing the remote
  traceback, so "Run all" stops there;
- interrupting the kernel cancels the remote execution (recorded ``cancelled``) and raises
  ``KeyboardInterrupt``;
- the notebook path, cell id and kernel id are recorded when the kernel knows them.

Misuse (an unknown or repeated option, a bad value, unbalanced quotes, an empty cell) raises
one :class:`~IPython.core.error.UsageError` saying what is wrong and how to write it; nothing
is submitted then. Option values may be quoted (``--name "my run"``).

Line magic: ``%crucible history [-n N] [--status S] [--tag T] [--user U]``,
``%crucible status ID``, ``%crucible queue``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import html
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import clear_output, display, publish_display_data

from .client import ThreadedClient, client_from_env, notebook_ref
from .errors import Conflict, CrucibleError
from .lines import Text, line_command
from .options import (
    CELL_HELP,
    NO_ANSWER,
    OPTIONS_USAGE,
    SUBMITTING,
    CellStatus,
    check_cell_body,
    failure_text,
    interrupted_text,
    lost_line,
    outcome_text,
    parse_cell_options,
    refused_line,
    traceback_trailer,
    wants_help,
)
from .output_policy import DISPLAY_KINDS, clean_output, trusted_types_from_env
from .terminal import escape

_SUBMIT_TIMEOUT = 60.0


def _interrupted(execution_id: str | None, state: str) -> KeyboardInterrupt:
    """The KeyboardInterrupt a cell raises when interrupted: shown as one line (what became
    of the execution), not as a stack of this module's frames."""
    text = interrupted_text(execution_id, state)
    exc = KeyboardInterrupt(text)
    exc._render_traceback_ = lambda: [f"KeyboardInterrupt: {text}"]  # type: ignore[attr-defined]
    return exc


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
            summary = outcome_text(status, reason)
        super().__init__(failure_text(summary, execution_id))

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of the local stack: the cell's own traceback."""
        lines = list(self.remote_traceback) or [f"{type(self).__name__}: {self}"]
        if _on_terminal(sys.stdout):  # terminal IPython: the cell's text must not drive it
            lines = [escape(line) for line in lines]
        if self.remote_traceback:
            lines.append(traceback_trailer(self.execution_id, self.status))
        return lines


class MimeBundle:
    """The cell's ``execute_result`` (as the output policy left it), handed to IPython as it
    is so it becomes ``Out[n]``."""

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
        self.mid_line = False  # the cell's last output did not end its line (terminal only)

    def show(self, text: str, *, force: bool = False) -> None:
        """Show ``text``; in a terminal only when it says something new."""
        if text == self.text and not force:
            return
        changed_state = text.split(" · ")[:2] != self.text.split(" · ")[:2]
        self.text = text
        if _on_terminal(sys.stdout):  # it may quote the cell's error (terminal IPython)
            text = escape(text)
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
            print(("\n" if self.mid_line else "") + text)
            self.mid_line = False


_F = TypeVar("_F", bound=Callable[..., Any])


def _cell_magic(name: str) -> Callable[[_F], _F]:
    """IPython's ``cell_magic(name)``, typed as the decorator it is (IPython types its result
    as a union that mypy cannot apply)."""
    return cast("Callable[[_F], _F]", cell_magic(name))


def _line_magic(name: str) -> Callable[[_F], _F]:
    """IPython's ``line_magic(name)``, typed like :func:`_cell_magic`."""
    return cast("Callable[[_F], _F]", line_magic(name))


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
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None:  # terminal IPython: no notebook, no kernel
            return notebook_ref()
        cell_id = None
        try:
            parent = kernel.get_parent() or {}
            cell_id = (parent.get("metadata") or {}).get("cellId")
        except Exception:  # noqa: BLE001 -- whatever the frontend sent, the cell still runs
            pass
        return notebook_ref(cell_id)

    # -- %%crucible ----------------------------------------------------------------------------

    @_cell_magic("crucible")
    def crucible_cell(self, line: str, cell: str) -> Any:
        """Run this cell as an isolated, recorded crucible execution (fresh process, no state
        shared with the kernel); output streams into the cell as it is produced."""
        if wants_help(line):
            return Text(CELL_HELP)
        request = parse_cell_options(line).to_request()
        check_cell_body(cell)
        request["code"] = cell
        notebook = self.notebook_ref()
        if notebook:
            request["notebook"] = notebook
        return self.run(request)

    crucible_cell.__doc__ = f"{crucible_cell.__doc__}\n\n{OPTIONS_USAGE}"

    def run(self, request: dict[str, Any]) -> Any:
        """Submit ``request``, relay its events into the cell, raise unless it succeeded."""
        status = StatusLine(live=getattr(self.shell, "kernel", None) is not None)
        status.show(SUBMITTING)
        execution = self._submit(request, status)
        relay = _Relay(execution["id"], status, self.client)
        try:
            for event in self.client.events(execution["id"]):
                relay.handle(event)
        except KeyboardInterrupt:
            state = relay.interrupted()
            raise _interrupted(execution["id"], state) from None
        except CrucibleError as e:  # the server went away mid-cell
            status.show(lost_line(execution["id"], e))
            raise UsageError(
                f"crucible: lost the stream of execution {execution['id']} ({e});"
                f" see %crucible status {execution['id']}"
            ) from None
        return relay.finish()

    def _submit(self, request: dict[str, Any], status: StatusLine) -> dict[str, Any]:
        """The queued execution; a refusal is one UsageError. Interrupted while the request
        is on its way, the execution it became is cancelled (nothing runs unwatched)."""
        future = self.client.run(self.client.client.submit(request))
        try:
            return future.result(_SUBMIT_TIMEOUT)
        except KeyboardInterrupt:
            # whatever happens to this wait (another interrupt), the execution the request
            # becomes is cancelled once it is accepted
            future.add_done_callback(self._cancel_when_accepted)
            execution_id, state = None, "being cancelled"
            try:
                execution_id = future.result(15)["id"]
                self.client.call("cancel", execution_id, timeout=15)
                state = "cancelled"
            except (Exception, KeyboardInterrupt):  # noqa: BLE001 -- refused, never accepted,
                pass  # already over, or interrupted again: the cell says what it knows
            raise _interrupted(execution_id, state) from None
        except CrucibleError as e:
            status.show(refused_line(e))
            raise UsageError(f"crucible: {e}") from None
        except concurrent.futures.TimeoutError:
            self.client.loop.call_soon_threadsafe(future.cancel)
            status.show(NO_ANSWER)
            raise UsageError(
                f"crucible: {self.client.description} did not accept the cell within"
                f" {_SUBMIT_TIMEOUT:g} s; see %crucible queue and %crucible history"
            ) from None

    def _cancel_when_accepted(self, future: concurrent.futures.Future) -> None:
        """Done-callback of an interrupted submit: cancel the execution it became, if any,
        on the client's loop (a refusal, e.g. already cancelled, is fine)."""
        if future.cancelled() or future.exception() is not None:
            return
        execution_id = future.result()["id"]

        async def cancel() -> None:
            with contextlib.suppress(CrucibleError):  # already over: nothing to cancel
                await self.client.client.cancel(execution_id)

        self.client.run(cancel())

    # -- %crucible -----------------------------------------------------------------------------

    @_line_magic("crucible")
    def crucible_line(self, line: str) -> Any:
        """``%crucible history [-n N] [--status S] [--tag T] [--user U]`` ·
        ``%crucible status ID`` · ``%crucible queue``: look at recorded executions and the
        queue."""
        return line_command(lambda: self.client, line)


class _Relay:
    """Turns one execution's events into cell output and a status line."""

    def __init__(self, execution_id: str, status: StatusLine, client: ThreadedClient) -> None:
        self.id = execution_id
        self.status = status
        self.client = client
        self.last_seq = -1
        self._position_checked = time.monotonic()
        self.cell = CellStatus(execution_id)
        self.result: MimeBundle | None = None
        self.error: dict[str, Any] | None = None
        self._render()

    @property
    def state(self) -> str:
        """The execution's state as last heard."""
        return self.cell.state

    @property
    def terminal(self) -> bool:
        """True once its terminal status event was seen."""
        return self.cell.terminal

    def _render(self) -> None:
        self.status.show(self.cell.line())

    def handle(self, event: dict[str, Any] | None) -> None:
        """Show one event (``None``: nothing new, refresh the clock)."""
        if event is None:
            if self.cell.state == "queued" and time.monotonic() - self._position_checked > 1:
                self._position_checked = time.monotonic()
                try:
                    position = self.client.call("queue_status", self.id, timeout=5).get("position")
                except Exception:  # noqa: BLE001 -- the position is a nicety; the stream goes on
                    position = None
                if position is not None:
                    self.cell.position = position
            self._render()
            return
        if isinstance(event.get("seq"), int):
            self.last_seq = max(self.last_seq, event["seq"])
        kind = event.get("type")
        if kind in DISPLAY_KINDS:
            event = clean_output(kind, event, trusted_types_from_env())
        if kind == "status":
            self.cell.update(event)
            self._render()
        elif kind == "stream":
            out = sys.stderr if event.get("name") == "stderr" else sys.stdout
            text = event.get("text", "")
            out.write(escape(text, keep_cr=True) if _on_terminal(out) else text)
            out.flush()
            if text:
                self.status.mid_line = not text.endswith("\n")
        elif kind in ("display_data", "update_display_data"):
            _flush_streams()
            publish_display_data(
                data=_for_terminal(event.get("data") or {}),
                metadata=event.get("metadata") or {},
                transient=event.get("transient") or None,
                update=kind == "update_display_data",
            )
        elif kind == "execute_result":
            self.result = MimeBundle(_for_terminal(event.get("data") or {}), event.get("metadata"))
        elif kind == "error":
            self.error = event
        elif kind == "clear_output":
            _flush_streams()
            clear_output(wait=bool(event.get("wait")))
            self.status.show(self.status.text, force=True)

    def interrupted(self) -> str:
        """Cancel the remote execution and show what it did until it ended (bounded); the
        state to report. Interrupted again meanwhile, it stops waiting at once (the cancel
        goes on): impatience is no reason for a traceback."""
        _flush_streams()
        try:
            self._cancel_and_follow()
        except KeyboardInterrupt:
            return self.state if self.terminal else "being cancelled"
        return self.state

    def _cancel_and_follow(self) -> None:
        client = self.client
        try:
            client.call("cancel", self.id, timeout=15)
        except Conflict:
            pass
        except Exception as e:  # noqa: BLE001 -- still raise KeyboardInterrupt; say why
            print(f"crucible: could not cancel {self.id}: {e}", file=sys.stderr)
            return
        deadline = time.monotonic() + 15
        try:
            for event in client.events(self.id, after=self.last_seq, tick=0.2):
                if event is not None:
                    self.handle(event)
                if self.terminal or time.monotonic() > deadline:
                    break
        except Exception:  # noqa: BLE001 -- what the cancelled cell did last: best effort
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
            reason=self.cell.reason,
            ename=err.get("ename"),
            evalue=err.get("evalue"),
            traceback=err.get("traceback"),
        )


def _on_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (the magic in terminal IPython), where a cell's text is
    shown escaped (see crucible_jupyter.terminal); a kernel's output streams are not."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _for_terminal(data: dict[str, Any]) -> dict[str, Any]:
    """A display's data with its ``text/plain`` escaped when IPython prints it to a terminal
    (what terminal IPython shows of a display); unchanged for a kernel's frontend."""
    text = data.get("text/plain")
    if isinstance(text, str) and _on_terminal(sys.stdout):
        return {**data, "text/plain": escape(text)}
    return data


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
            stream.flush()


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
