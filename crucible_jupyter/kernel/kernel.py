"""The "Python (Crucible isolated)" kernel: every cell is sent to a crucible dispatcher.

A wrapper kernel in the manner of sparkmagic's: it evaluates nothing itself. Each cell becomes
one isolated execution in a fresh process, so **no state carries between cells** (variables,
imports, files in /tmp): put everything a cell needs in that cell.

Promises:

- output frames become Jupyter messages: ``stream`` (stdout/stderr), ``display_data``,
  ``update_display_data``, ``execute_result`` (with this kernel's execution count),
  ``error`` (remote traceback), ``clear_output``; they are published as they arrive, rich
  output cleaned by the output policy once more
  (:func:`crucible_jupyter.output_policy.clean_output`): nothing in it can run in the browser;
- a status line (display id, updated in place) says queued/running/finished and the
  execution id, unless ``CrucibleKernel.status_line`` is off
  (env ``CRUCIBLE_KERNEL_STATUS_LINE=0``);
- interrupt (``interrupt_mode: message``) cancels the running execution, which is recorded
  ``cancelled``; the cell then fails with ``KeyboardInterrupt``;
- a first line ``%%crucible --timeout 5 --memory 1Gi ...`` sets that cell's options (the
  magic's options; misuse is one ``UsageError`` and nothing runs);
- a one-line cell ``%crucible history|status ID|queue`` is answered by the kernel;
- other IPython syntax (``%magic``, ``!cmd``, ``obj?``) fails at once with ``UsageError``
  naming the line, since the sandbox runs plain Python; ``input()`` fails (no stdin);
- comms (ipywidgets) are closed at once with the reason: no live object to talk to;
- notebook path, cell id and kernel id are recorded when known;
- it reaches the Jupyter server that started it (``CRUCIBLE_SERVER_URL``/``CRUCIBLE_TOKEN``),
  else runs an in-process dispatcher.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import re
import sys
from typing import Any

from ipykernel.kernelbase import Kernel
from IPython.core.error import UsageError
from traitlets import Bool, default

from .. import __version__
from ..client import ThreadedClient, client_from_env, notebook_ref
from ..errors import Conflict, CrucibleError
from ..options import (
    CELL_HELP,
    OPTIONS_EXAMPLE,
    CellStatus,
    check_cell_body,
    failure_text,
    interrupted_text,
    outcome_text,
    parse_cell_options,
    split_cell,
    traceback_trailer,
    wants_help,
)
from ..output_policy import DISPLAY_KINDS, clean_output, trusted_types_from_env
from ..protocol import ENV_KERNEL_STATUS_LINE, env_flag, is_terminal_event

BANNER = (
    f"Python (Crucible isolated) {__version__} - Python {sys.version.split()[0]}\n"
    "Every cell runs as a separate, isolated, recorded execution in a fresh process:\n"
    "no variables, imports or files carry over from one cell to the next.\n"
    f"Options for one cell: first line '{OPTIONS_EXAMPLE}'."
)


class CrucibleKernel(Kernel):
    """ipykernel ``Kernel`` that runs every cell through a crucible dispatcher (stateless)."""

    implementation = "crucible"
    implementation_version = __version__
    language = "python"
    language_version = sys.version.split()[0]
    language_info = {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    }
    banner = BANNER

    status_line = Bool(
        config=True,
        help="""Show a status line (queued/running/finished, execution id) in each cell's
        output, updated in place. Default from env CRUCIBLE_KERNEL_STATUS_LINE (on unless 0).""",
    )

    @default("status_line")
    def _default_status_line(self) -> bool:
        return env_flag(ENV_KERNEL_STATUS_LINE, True)

    @default("help_links")
    def _default_help_links(self) -> list[dict[str, str]]:
        return [{"text": "Python Reference", "url": "https://docs.python.org/3/"}]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client: ThreadedClient | None = None
        self._current: str | None = None
        self._submitting = False
        self._interrupted = False
        self.shell_handlers["comm_open"] = self.comm_open
        self.shell_handlers["comm_msg"] = self.comm_ignored
        self.shell_handlers["comm_close"] = self.comm_ignored

    @property
    def client(self) -> ThreadedClient:
        """The dispatcher client: the Jupyter server that started us, or embedded."""
        if self._client is None:
            self._client = ThreadedClient(client_from_env())
        return self._client

    # -- execute -------------------------------------------------------------------------------

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``code`` as one isolated execution and relay its output."""
        expressions = {
            name: _error_content(
                "NotSupported", "user_expressions need kernel state; this kernel has none"
            )
            for name in (user_expressions or {})
        }
        self._interrupted = False
        if not code.strip():
            return self._ok(expressions)
        line = _line_command(code)
        if line is not None:
            return await self._line_command(line, silent, expressions)
        if _cell_help(code):
            if not silent:
                text = {"name": "stdout", "text": CELL_HELP + "\n"}
                self.send_response(self.iopub_socket, "stream", text)
            return self._ok(expressions)
        try:
            request = self._request(code, cell_meta, cell_id)
        except UsageError as e:
            return self._fail("UsageError", str(e), [], silent)
        not_python = _ipython_syntax(request["code"])
        if not_python:
            return self._fail("UsageError", not_python, [], silent)
        self._submitting = True
        try:
            execution = await asyncio.wrap_future(
                self.client.run(self.client.client.submit(request))
            )
        except CrucibleError as e:
            return self._fail(type(e).__name__, str(e), [], silent)
        finally:
            self._submitting = False
        execution_id = execution["id"]
        self._current = execution_id
        try:
            if self._interrupted:  # interrupted while the request was on its way
                await self._cancel(execution_id)
            return await self._relay(execution_id, silent, expressions)
        finally:
            self._current = None

    async def _line_command(self, line: str, silent: bool, expressions: dict) -> dict[str, Any]:
        """``%crucible history|status ID|queue``, answered here (nothing runs)."""
        from ..lines import line_command

        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(None, line_command, lambda: self.client, line)
        except UsageError as e:
            return self._fail("UsageError", str(e), [], silent)
        if result is not None and not silent:
            data = {"text/plain": repr(result)}
            to_html = getattr(result, "_repr_html_", None)
            if to_html is not None:
                data["text/html"] = to_html()
            content = {"execution_count": self.execution_count, "data": data, "metadata": {}}
            self.send_response(self.iopub_socket, "execute_result", content)
        return self._ok(expressions)

    def _request(self, code: str, cell_meta: dict | None, cell_id: str | None) -> dict[str, Any]:
        request: dict[str, Any] = {"code": code}
        cell = split_cell(code)
        if cell is not None:
            line, body = cell
            request = parse_cell_options(line).to_request()
            check_cell_body(body)
            request["code"] = body
        notebook = notebook_ref(cell_id or (cell_meta or {}).get("cellId"))
        if notebook:
            request["notebook"] = notebook
        return request

    async def _relay(self, execution_id: str, silent: bool, expressions: dict) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        future = self.client.start_stream(
            execution_id, lambda item: loop.call_soon_threadsafe(events.put_nowait, item)
        )
        status = _KernelStatus(self, execution_id, enabled=self.status_line and not silent)
        error: dict[str, Any] | None = None
        state = "queued"
        reason = None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    status.tick()
                    continue
                if isinstance(item, BaseException):
                    return self._fail(type(item).__name__, str(item), [], silent)
                if not isinstance(item, dict):  # end of stream
                    break
                kind = item.get("type")
                if kind == "status":
                    state = item.get("status", state)
                    status.update(item)
                    if is_terminal_event(item):
                        reason = item.get("reason")
                        break
                elif kind == "error":
                    error = item
                elif not silent:
                    self._publish(item)
                    if kind == "clear_output":
                        status.cleared()
        finally:
            if not future.done():
                future.cancel()
        if state == "succeeded":
            return self._ok(expressions)
        if self._interrupted and state == "cancelled":
            return self._fail(
                "KeyboardInterrupt", interrupted_text(execution_id, state), [], silent
            )
        if error:
            tb = [*error.get("traceback", []), traceback_trailer(execution_id, state)]
            return self._fail(error.get("ename", "Error"), error.get("evalue", ""), tb, silent)
        text = outcome_text(state, reason)
        return self._fail("RemoteExecutionError", failure_text(text, execution_id), [], silent)

    def _publish(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind in DISPLAY_KINDS:
            frame = clean_output(kind, frame, trusted_types_from_env())
        if kind == "stream":
            content = {"name": frame.get("name", "stdout"), "text": frame.get("text", "")}
        elif kind in ("display_data", "update_display_data"):
            content = {
                "data": frame.get("data") or {},
                "metadata": frame.get("metadata") or {},
                "transient": frame.get("transient") or {},
            }
        elif kind == "execute_result":
            content = {
                "execution_count": self.execution_count,
                "data": frame.get("data") or {},
                "metadata": frame.get("metadata") or {},
            }
        elif kind == "clear_output":
            content = {"wait": bool(frame.get("wait"))}
        else:
            return
        self.send_response(self.iopub_socket, kind, content)

    def _ok(self, expressions: dict) -> dict[str, Any]:
        return {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": expressions,
        }

    def _fail(self, ename: str, evalue: str, traceback: list[str], silent: bool) -> dict[str, Any]:
        content = _error_content(ename, evalue, traceback or [f"{ename}: {evalue}"])
        if not silent:
            self.send_response(self.iopub_socket, "error", content)
        return {**content, "execution_count": self.execution_count}

    # -- interrupt -----------------------------------------------------------------------------

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Cancel the running execution (``interrupt_mode: message``) and reply ok."""
        execution_id = self._current
        content: dict[str, Any] = {"status": "ok"}
        if execution_id or self._submitting:
            self._interrupted = True  # a submission under way is cancelled once it is queued
        if execution_id:
            try:
                await self._cancel(execution_id)
            except CrucibleError as e:
                content = _error_content(type(e).__name__, str(e))
        if self.session:
            self.session.send(stream, "interrupt_reply", content, parent, ident=ident)

    async def _cancel(self, execution_id: str) -> None:
        with contextlib.suppress(Conflict):  # it had finished already
            await asyncio.wrap_future(self.client.run(self.client.client.cancel(execution_id)))

    # -- comms: none (there is no live object for a widget to talk to) ---------------------

    def comm_open(self, stream: Any, ident: Any, parent: Any) -> None:
        """Refuse a comm at once (``comm_close`` with the reason), as for an unknown target:
        widgets need a live kernel-side object, and each cell here is a finished process."""
        comm_id = (parent.get("content") or {}).get("comm_id")
        if comm_id and self.session:
            content = {
                "comm_id": comm_id,
                "data": {
                    "error": "the crucible kernel has no comms: interactive widgets"
                    " (ipywidgets) need a live kernel; each cell runs in a process that"
                    " has ended"
                },
            }
            self.session.send(self.iopub_socket, "comm_close", content, parent)

    def comm_ignored(self, stream: Any, ident: Any, parent: Any) -> None:
        """``comm_msg``/``comm_close``: there is no comm to deliver them to."""

    # -- introspection (static: there is no state to inspect) --------------------------------

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        """Whether ``code`` is a complete Python cell (IPython's rules)."""
        from IPython.core.inputtransformer2 import TransformerManager

        status, indent = TransformerManager().check_complete(code)
        reply: dict[str, Any] = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        """Static completions (keywords, builtins, importable names) from jedi, when available."""
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        matches: list[str] = []
        start = cursor_pos
        try:
            import jedi

            before = code[:cursor_pos]
            line = before.count("\n") + 1
            column = len(before.rsplit("\n", 1)[-1])
            m = re.search(r"[A-Za-z_][A-Za-z0-9_]*$", before)
            start = cursor_pos - (len(m.group(0)) if m else 0)
            matches = [c.name for c in jedi.Script(code).complete(line, column)][:200]
        except Exception:  # noqa: BLE001 -- no jedi, or jedi failing on odd code: no matches
            matches = []
        return {
            "status": "ok",
            "matches": matches,
            "cursor_start": start,
            "cursor_end": cursor_pos,
            "metadata": {},
        }

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """Close the client (stopping an embedded dispatcher)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        return {"status": "ok", "restart": restart}


class _KernelStatus:
    """The kernel's status line: one display id, updated in place."""

    def __init__(self, kernel: CrucibleKernel, execution_id: str, *, enabled: bool) -> None:
        self.kernel = kernel
        self.id = execution_id
        self.enabled = enabled
        # not guessable from the cell, so its own display updates cannot rewrite the status
        self.display_id = f"crucible-{execution_id}-{os.urandom(8).hex()}"
        self.shown = False
        self.status = CellStatus(execution_id)
        self.text = ""
        self._send(self.status.line())

    def _send(self, text: str) -> None:
        if not self.enabled or text == self.text:
            return
        self.text = text
        content = {
            "data": {"text/plain": text},
            "metadata": {},
            "transient": {"display_id": self.display_id},
        }
        kind = "update_display_data" if self.shown else "display_data"
        self.kernel.send_response(self.kernel.iopub_socket, kind, content)
        self.shown = True

    def update(self, event: dict[str, Any]) -> None:
        """Show a status event."""
        self.status.update(event)
        self._send(self.status.line())

    def cleared(self) -> None:
        """The cell cleared its output, this line with it: show the line again, as a new
        output (an update of a cleared display shows nothing)."""
        text, self.text, self.shown = self.text, "", False
        if text:
            self._send(text)

    def tick(self) -> None:
        """Refresh the elapsed time."""
        self._send(self.status.line())


_IPYTHON_LINE = re.compile(r"^\s*(?:%|!|[\w.]+\s*=\s*[%!])|\?\s*$")


def _line_command(code: str) -> str | None:
    """The arguments of a one-line ``%crucible ...`` cell (history, status, queue), else None."""
    text = code.strip()
    m = re.fullmatch(r"%crucible(?:\s+(.*))?", text)
    return None if m is None else (m.group(1) or "")


def _cell_help(code: str) -> bool:
    """Whether ``code``'s first line is ``%%crucible`` asking for help (``-h``/``--help``)."""
    cell = split_cell(code)
    return cell is not None and wants_help(cell[0])


def _ipython_syntax(code: str) -> str | None:
    """Why ``code`` cannot run here when it uses IPython syntax (a magic, ``!cmd``,
    ``obj?``) that Python rejects; None for anything else (even other syntax errors, which
    the cell reports itself)."""
    try:
        ast.parse(code)
        return None
    except SyntaxError as e:
        lineno = e.lineno or 0
        lines = code.splitlines()
        line = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    except (ValueError, RecursionError, MemoryError):  # null bytes, deep nesting: the cell's own
        return None
    if not _IPYTHON_LINE.search(line):
        return None
    return (
        f"line {lineno}: {line.strip()!r} is IPython syntax (magic, ! shell command or ?"
        " help), not Python. The crucible kernel runs each cell as plain Python in a fresh"
        " sandbox, where these are not available. Here you can use: %crucible history,"
        " %crucible status ID, %crucible queue (one per cell), and a first line"
        f" '{OPTIONS_EXAMPLE}' for a cell's options; subprocess.run([...]) in place of !cmd."
    )


def _error_content(ename: str, evalue: str, traceback: list[str] | None = None) -> dict[str, Any]:
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": traceback or []}
