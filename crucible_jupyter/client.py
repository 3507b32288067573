"""Clients the magic and the kernel use to reach a dispatcher: remote (a Jupyter server's
crucible API) or embedded (an in-process Dispatcher).

- :class:`RemoteClient` speaks the REST + WebSocket API of the ``crucible`` server extension.
- :class:`EmbeddedClient` runs a :class:`~crucible_jupyter.dispatcher.Dispatcher` in this
  process (plain IPython, a kernel started outside a Jupyter server).
- :func:`client_from_env` picks one: remote when ``CRUCIBLE_SERVER_URL`` is set (the server
  extension sets it, with ``CRUCIBLE_TOKEN``, for kernels it starts), else embedded.
- :class:`ThreadedClient` runs either on a private event loop in a daemon thread, so
  synchronous code (a cell magic) can submit, stream and cancel while its own thread blocks,
  and ``KeyboardInterrupt`` reaches that thread.

All of them speak plain dicts: executions as ``Execution.to_dict()``, events as
``Event.to_dict()``. Failures raise the :mod:`crucible_jupyter.errors` class the server named.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import json
import os
import queue
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from . import errors
from .errors import CrucibleError, Unavailable
from .protocol import (
    ENV_SERVER_URL,
    ENV_TOKEN,
    KERNEL_TOKEN_HEADER,
    is_terminal_event,
    local_user,
)


class AsyncClient(Protocol):
    """What the magic and the kernel need from a dispatcher, as coroutines on dicts."""

    description: str

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Validate and queue ``request``; the queued execution."""

    def stream(self, execution_id: str, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """Every event after ``after``; ends after the terminal status event."""

    async def get(self, execution_id: str) -> dict[str, Any]:
        """The execution with its stored ``events``."""

    async def cancel(self, execution_id: str) -> dict[str, Any]:
        """Cancel; Conflict if it already finished."""

    async def list(self, **filters: Any) -> dict[str, Any]:
        """``{"executions": [...], "next_cursor": ...}``."""

    async def queue_status(self, execution_id: str | None = None) -> dict[str, Any]:
        """Depth per priority, running, capacity, position."""

    async def close(self) -> None:
        """Release connections (and stop an embedded dispatcher)."""


def _error_from(status: int, body: bytes) -> CrucibleError:
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    kind = data.get("error") if isinstance(data, dict) else None
    message = (data.get("message") if isinstance(data, dict) else None) or f"HTTP {status}"
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, CrucibleError)):
        cls = {
            400: errors.InvalidRequest,
            403: errors.Forbidden,
            404: errors.NotFound,
            409: errors.Conflict,
            413: errors.RequestTooLarge,
            422: errors.UnsupportedLanguage,
            503: errors.Unavailable,
        }.get(status, CrucibleError)
    return cls(message, field=data.get("field") if isinstance(data, dict) else None)


def _execution_path(execution_id: str, action: str = "") -> str:
    """``executions/{id}[/action]`` with the id quoted, so an id with a space, ``/`` or ``?``
    (typed by a user) names that id and nothing else."""
    path = f"executions/{quote(execution_id, safe='')}"
    return f"{path}/{action}" if action else path


class RemoteClient:
    """Client of a Jupyter server's crucible API (``{server_url}crucible/api/``).

    ``token`` is sent as ``X-Crucible-Token`` (the kernel credential); ``jupyter_token`` as
    ``Authorization: token ...`` (a Jupyter server token). A dropped stream is resumed from
    the last seq seen, so no event is lost or repeated.
    """

    def __init__(
        self,
        server_url: str,
        token: str | None = None,
        *,
        jupyter_token: str | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self.server_url = server_url if server_url.endswith("/") else server_url + "/"
        self.api = self.server_url + "crucible/api/"
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers[KERNEL_TOKEN_HEADER] = token
        if jupyter_token:
            self.headers["Authorization"] = f"token {jupyter_token}"
        self.request_timeout = request_timeout
        self.description = f"server {self.server_url}"
        self._http: Any = None

    def _client(self) -> Any:
        if self._http is None:
            from tornado.httpclient import AsyncHTTPClient

            self._http = AsyncHTTPClient(force_instance=True)
        return self._http

    async def _call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        from tornado.httpclient import HTTPClientError, HTTPRequest

        query = {k: v for k, v in params.items() if v is not None}
        url = self.api + path + (f"?{urlencode(query, doseq=True)}" if query else "")
        request = HTTPRequest(
            url,
            method=method,
            headers=self.headers,
            body=None if body is None and method != "POST" else json.dumps(body or {}),
            request_timeout=self.request_timeout,
            allow_nonstandard_methods=True,
        )
        try:
            response = await self._client().fetch(request)
        except HTTPClientError as e:
            if e.response is None:
                raise Unavailable(f"crucible server {self.server_url} did not answer: {e}") from e
            raise _error_from(e.code, e.response.body) from None
        except OSError as e:
            raise Unavailable(f"cannot reach the crucible server {self.server_url}: {e}") from e
        return json.loads(response.body) if response.body else None

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """POST executions."""
        return await self._call("POST", "executions", request)

    async def get(self, execution_id: str) -> dict[str, Any]:
        """GET executions/{id}."""
        return await self._call("GET", _execution_path(execution_id))

    async def cancel(self, execution_id: str) -> dict[str, Any]:
        """POST executions/{id}/cancel."""
        return await self._call("POST", _execution_path(execution_id, "cancel"), {})

    async def list(self, **filters: Any) -> dict[str, Any]:
        """GET executions with filters."""
        return await self._call("GET", "executions", **filters)

    async def queue_status(self, execution_id: str | None = None) -> dict[str, Any]:
        """GET queue."""
        return await self._call("GET", "queue", execution_id=execution_id)

    async def stream(self, execution_id: str, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """Events over the WebSocket, reconnecting after a drop (up to 5 times in a row)."""
        from tornado.httpclient import HTTPClientError, HTTPRequest
        from tornado.websocket import websocket_connect

        parts = urlsplit(self.api)
        scheme = "wss" if parts.scheme == "https" else "ws"
        base = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        failures = 0
        while True:
            url = f"{base}{_execution_path(execution_id, 'stream')}?after={after}"
            headers = {k: v for k, v in self.headers.items() if k != "Content-Type"}
            try:
                ws = await websocket_connect(
                    HTTPRequest(url, headers=headers, request_timeout=self.request_timeout),
                    ping_interval=None,
                )
            except HTTPClientError as e:
                if e.response is not None and e.code != 599:
                    raise _error_from(e.code, e.response.body) from None
                failures += 1
                if failures > 5:
                    raise Unavailable(f"lost the stream of {execution_id}: {e}") from e
                await asyncio.sleep(0.2 * failures)
                continue
            except OSError as e:
                failures += 1
                if failures > 5:
                    raise Unavailable(f"cannot reach the crucible server: {e}") from e
                await asyncio.sleep(0.2 * failures)
                continue
            try:
                while True:
                    message = await ws.read_message()
                    if message is None:
                        break
                    event = json.loads(message)
                    after = max(after, int(event.get("seq", after)))
                    failures = 0
                    yield event
                    if is_terminal_event(event):
                        return
            finally:
                ws.close()
            failures += 1
            if failures > 5:
                raise Unavailable(f"the stream of {execution_id} kept closing early")
            await asyncio.sleep(0.1 * failures)

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            self._http.close()
            self._http = None


class EmbeddedClient:
    """An in-process dispatcher, started on first use (plain IPython, standalone kernels).

    Records are made as ``user`` (default: the operating-system user). The dispatcher is
    configured by its own traits' defaults and environment variables, or by ``config``.
    """

    def __init__(self, *, user: str | None = None, config: Any = None, dispatcher: Any = None):
        self.user = user or local_user()
        self._config = config
        self._dispatcher = dispatcher
        self._started = False
        self._lock: asyncio.Lock | None = None
        self.description = "embedded dispatcher"

    async def dispatcher(self) -> Any:
        """The started in-process dispatcher."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._dispatcher is None:
                from .dispatcher import Dispatcher

                self._dispatcher = Dispatcher(config=self._config) if self._config else Dispatcher()
            if not self._started:
                await self._dispatcher.start()
                self._started = True
        return self._dispatcher

    async def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Submit as this client's user."""
        d = await self.dispatcher()
        return (await d.submit(request, user=self.user)).to_dict()

    async def get(self, execution_id: str) -> dict[str, Any]:
        """The execution with its stored events."""
        d = await self.dispatcher()
        execution = await d.get(execution_id)
        events = await d.events(execution_id, after=-1)
        return {**execution.to_dict(), "events": [e.to_dict() for e in events]}

    async def cancel(self, execution_id: str) -> dict[str, Any]:
        """Cancel."""
        d = await self.dispatcher()
        return (await d.cancel(execution_id)).to_dict()

    async def list(self, **filters: Any) -> dict[str, Any]:
        """A page of executions."""
        d = await self.dispatcher()
        page, cursor = await d.list(**filters)
        return {"executions": [e.to_dict() for e in page], "next_cursor": cursor}

    async def queue_status(self, execution_id: str | None = None) -> dict[str, Any]:
        """The dispatcher's queue status."""
        d = await self.dispatcher()
        return d.queue_status(execution_id=execution_id)

    async def stream(self, execution_id: str, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """Events from the dispatcher's event bus."""
        d = await self.dispatcher()
        async for event in d.subscribe(execution_id, after=after):
            yield event.to_dict()

    async def close(self) -> None:
        """Stop the embedded dispatcher (cancels what still runs)."""
        if self._dispatcher is not None and self._started:
            self._started = False
            await self._dispatcher.stop()


def client_from_env(environ: dict[str, str] | None = None) -> AsyncClient:
    """Remote client of this kernel's Jupyter server when it handed us one, else embedded."""
    env = os.environ if environ is None else environ
    url = env.get(ENV_SERVER_URL)
    if url:
        return RemoteClient(url, env.get(ENV_TOKEN))
    return EmbeddedClient()


class _End:
    pass


class ThreadedClient:
    """Runs an :class:`AsyncClient` on a private event loop in a daemon thread.

    Blocking calls (``submit``, ``cancel``...) wait for the result; :meth:`events` yields
    events as they arrive and ``None`` every ``tick`` seconds while none do, so a caller can
    refresh a clock. The caller's thread stays interruptible (KeyboardInterrupt).
    """

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.description = client.description
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="crucible-client", daemon=True)
        self._thread.start()
        self._closed = False
        atexit.register(self.close)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> concurrent.futures.Future:
        """Schedule ``coro`` on the client loop; a concurrent Future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, name: str, *args: Any, timeout: float | None = 60.0, **kwargs: Any) -> Any:
        """Call the client's coroutine method ``name`` and wait for its result."""
        return self.run(getattr(self.client, name)(*args, **kwargs)).result(timeout)

    def start_stream(
        self, execution_id: str, on_event: Callable[[Any], object], after: int = -1
    ) -> concurrent.futures.Future:
        """Feed every event (then an end marker or the exception) to ``on_event`` from the loop."""

        async def pump() -> None:
            try:
                async for event in self.client.stream(execution_id, after=after):
                    on_event(event)
            except BaseException as e:  # handed to the consumer, never swallowed
                on_event(e)
                raise
            on_event(_End)

        return self.run(pump())

    def events(self, execution_id: str, *, after: int = -1, tick: float = 0.5) -> Iterator[Any]:
        """Yield events (dicts) until the terminal one; ``None`` on each idle ``tick``."""
        q: queue.Queue = queue.Queue()
        future = self.start_stream(execution_id, q.put, after=after)
        try:
            while True:
                try:
                    item = q.get(timeout=tick)
                except queue.Empty:
                    yield None
                    continue
                if item is _End:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not future.done():
                self.loop.call_soon_threadsafe(future.cancel)

    def close(self) -> None:
        """Close the client (stopping an embedded dispatcher) and the loop thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self.client.close()).result(30)
            # transports of processes that ended but were never closed are released while
            # their loop still runs (not at exit, where they complain about a closed loop)
            self.run(_release_garbage()).result(5)
        except Exception:  # noqa: BLE001 -- a client that cannot close (server gone, loop
            pass  # stuck) must not keep the loop thread from stopping
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


async def _release_garbage() -> None:
    import gc

    await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)


def notebook_ref(cell_id: object = None) -> dict[str, str]:
    """Where a cell comes from, as far as this process knows: the notebook ``path`` (env
    ``JPY_SESSION_NAME``, set by a Jupyter server for a session's kernel), ``cell_id`` when
    it is a non-empty string, and this kernel's id. Shared by the magic and the kernel."""
    ref: dict[str, str] = {}
    path = os.environ.get("JPY_SESSION_NAME")
    if path:
        ref["path"] = path
    if isinstance(cell_id, str) and cell_id:
        ref["cell_id"] = cell_id
    kernel_id = current_kernel_id()
    if kernel_id:
        ref["kernel_id"] = kernel_id
    return ref


def current_kernel_id() -> str | None:
    """This kernel's id, from its connection file name (``kernel-<id>.json``)."""
    try:
        from ipykernel.kernelapp import IPKernelApp

        if not IPKernelApp.initialized():
            return None
        name = os.path.basename(IPKernelApp.instance().connection_file or "")
    except Exception:  # noqa: BLE001 -- no ipykernel, or an app without a connection file
        return None
    m = re.match(r"^kernel-(.+)\.json$", name)
    return m.group(1) if m else None
