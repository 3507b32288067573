"""Remote mode of the server extension: a user server that forwards its crucible API to the
hub's crucible service (``c.CrucibleApp.service_url``) instead of running a dispatcher.

It promises:

* the server's own API (``{base_url}crucible/api/...``, REST and WebSockets) stays what the
  magic, the crucible kernel and the JupyterLab panel use, unchanged; every call passes
  jupyter_server's authentication and authorizer (``read``/``write`` on ``crucible``) and is
  then sent to ``{service_url}api/...`` with the server's own JupyterHub token
  (``Authorization: token $JUPYTERHUB_API_TOKEN``), so the service records the server's
  JupyterHub user as the owner;
* no dispatcher, no database and no cluster credentials in the user server;
* the service's answers are relayed as they are (status and JSON body), with the
  ``Location`` header and the OpenAPI document's ``servers`` pointing at this server;
  a service that does not answer is a 503 at once (never a hang) saying it is unreachable,
  where it was looked for and whom to ask; a token the service refuses (401) is a 503 too,
  since the browser's user cannot fix it by logging in; the service's messages name this
  server's API path, not the service's;
* an execution's stream outlives a restart of the service: when the service's socket drops
  before the terminal event (the service was killed, or restarts), the server connects
  again with ``after`` = the last ``seq`` relayed, for up to ``service_timeout`` seconds, so
  the client sees every event once and then the end the restarted service recorded; past
  that, the socket closes with 1011 and a reason. The change feed closes with 1011 when the
  service's drops (clients reconnect);
* the server's own credentials (``?token=``, ``_xsrf``) are never forwarded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from ..errors import CrucibleError, Unavailable
from ..protocol import is_terminal_event
from .base import CrucibleAPIHandler
from .stream import JupyterSocket, _CrucibleSocket

#: Query parameters that authenticate to this server: never sent on to the service.
_LOCAL_QUERY = frozenset({"token", "_xsrf"})


class Relayed(CrucibleError):
    """An error answer of the service, relayed with its own status and body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(str(body.get("message", "")), field=body.get("field"))
        self.status_code = status
        self.body = body

    def to_dict(self) -> dict[str, Any]:
        """The service's own error body."""
        return dict(self.body)


if TYPE_CHECKING:  # what the mixin is mixed into (before it), as the type checker sees it
    from .base import CrucibleMixin as _Host
else:
    _Host = object


class _RemoteMixin(_Host):
    """Where the service is, how to reach it, and how its refusals are told."""

    def service_url(self, upstream: str = "http") -> str:
        """The service URL of this request's path under the API root, with its query."""
        app = self.crucible
        rest = self.request.path[len(app.api_root) :].lstrip("/")
        url = app.service_api_url + rest
        query = [
            (k, v.decode("utf-8", "replace"))
            for k, values in self.request.query_arguments.items()
            if k not in _LOCAL_QUERY
            for v in values
        ]
        if query:
            url += "?" + urlencode(query)
        if upstream == "ws":
            url = "ws" + url[len("http") :]
        return url

    def auth_headers(self) -> dict[str, str]:
        """The server's hub token, for the service."""
        token = self.crucible.service_token
        if not token:
            raise Unavailable(
                "this server forwards crucible to a service but has no JupyterHub token to"
                " send (JUPYTERHUB_API_TOKEN is empty; set c.CrucibleApp.service_token)"
            )
        return {"Authorization": f"token {token}"}

    def unreachable(self, url: str, error: Any) -> Unavailable:
        """The 503 for a service that did not answer."""
        app = self.crucible
        return Unavailable(
            f"the crucible service at {app.service_url} is unreachable ({error}); it may be"
            " restarting: retry in a moment, and if it stays so ask your JupyterHub"
            " administrator whether `crucible serve` runs"
        )

    def local_paths(self, text: str) -> str:
        """``text`` with the service's API path replaced by this server's (so a message says
        where the caller can send the next request)."""
        app = self.crucible
        theirs = urlsplit(app.service_api_url).path  # /services/crucible/api/
        return text.replace(theirs, app.api_root + "/") if theirs else text

    def relayed(self, status: int, text: bytes | None) -> CrucibleError:
        """The service's error answer as an error of this server."""
        try:
            body = json.loads(text or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("message"), str):
            if status in (502, 503, 504):  # a proxy or load balancer's page: nobody behind it
                return self.unreachable(self.crucible.service_url, f"HTTP {status}")
            body = {}
        body.setdefault("error", "ServiceError")
        body.setdefault("message", f"the crucible service answered {status}")
        if isinstance(body["message"], str):
            body["message"] = self.local_paths(body["message"])
        if status == 401:  # this server's token, not the browser user's login: 503
            body["message"] = (
                f"the crucible service refused this server's JupyterHub token:"
                f" {body['message']}; restart your server to get a fresh one"
            )
            return Relayed(503, {**body, "error": "Unavailable"})
        return Relayed(status, body)


class RemoteAPIHandler(_RemoteMixin, CrucibleAPIHandler):  # type: ignore[misc, override]
    """Every REST endpoint of ``crucible/api/``, forwarded to the service."""

    async def get(self, path: str = "") -> None:
        """Forward a read."""
        await self.authorize("read")
        await self._forward()

    async def post(self, path: str = "") -> None:
        """Forward a write (submit, cancel)."""
        await self.authorize("write")
        await self._forward()

    async def delete(self, path: str = "") -> None:
        """Forward a cancel."""
        await self.authorize("write")
        await self._forward()

    async def _forward(self) -> None:
        url = self.service_url()
        body = None
        if self.request.method == "POST":
            body = self.request.body or b""
            if self.request.path.rstrip("/").endswith("/executions"):
                payload = self.json_body()  # 413/400 here, as in the embedded mode
                if isinstance(payload, dict):
                    payload = await self._with_notebook_path(payload)
                body = json.dumps(payload).encode()
        request = HTTPRequest(
            url,
            method=self.request.method,
            headers={**self.auth_headers(), "Content-Type": "application/json"},
            body=body,
            connect_timeout=10,
            request_timeout=self.crucible.service_timeout,
            allow_nonstandard_methods=True,
            follow_redirects=False,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except Exception as e:  # noqa: BLE001 -- DNS, refused connection, TLS...
            raise self.unreachable(url, e) from None
        if response.code == 599:
            raise self.unreachable(url, response.error)
        if response.code >= 400:
            raise self.relayed(response.code, response.body)
        try:
            data = json.loads(response.body or b"null")
        except ValueError:
            raise Unavailable(
                f"{self.crucible.service_url} answered {response.code} with something that is"
                " not the crucible API (not JSON); check CRUCIBLE_SERVICE_URL"
                " (c.CrucibleApp.service_url): it is the service's URL with its prefix, such as"
                " http://crucible:8576/services/crucible/"
            ) from None
        if self.request.path.endswith("/openapi.json") and isinstance(data, dict):
            data["servers"] = [{"url": self.crucible.api_root}]
        location = response.headers.get("Location")
        if location and "/executions/" in location:
            self.set_header(
                "Location",
                f"{self.crucible.api_root}/executions/{location.rsplit('/', 1)[-1]}",
            )
        self.write_json(data, status=response.code)

    async def _with_notebook_path(self, body: dict[str, Any]) -> dict[str, Any]:
        from .handlers import ExecutionsAPI

        return await ExecutionsAPI._with_notebook_path(self, body)  # type: ignore[arg-type]


class RemoteSocket(_RemoteMixin, _CrucibleSocket, JupyterSocket):  # type: ignore[misc, override]
    """A WebSocket of ``crucible/api/`` (stream, changes), relayed from the service's."""

    endpoint = "reconnect"
    _upstream: WebSocketClientConnection | None = None
    #: Seconds between attempts to reach a service whose stream dropped mid-execution.
    reconnect_interval = 0.5
    #: Drops of an execution's stream in a row (no message between them) before giving up.
    max_drops = 5

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Authorize, connect to the service (its refusal is this answer), then upgrade."""
        await self.authorize("read")
        self.require_upgrade("the REST endpoints answer over plain HTTP")
        url = self.service_url("ws")
        try:
            self._upstream = await self._connect(url)
        except HTTPClientError as e:
            if e.code == 599 or e.response is None:
                raise self.unreachable(url, e) from None
            raise self.relayed(e.code, e.response.body) from None
        except Exception as e:  # noqa: BLE001 -- any other failure: the service is unreachable
            raise self.unreachable(url, e) from None
        await super().get(*args, **kwargs)

    async def _connect(self, url: str) -> WebSocketClientConnection:
        request = HTTPRequest(
            url, headers=self.auth_headers(), connect_timeout=10, request_timeout=30
        )
        return await websocket_connect(request)

    async def relay(self):
        """The service's messages, one by one, until it closes (an execution's stream: until
        its terminal event, across restarts of the service)."""
        stream = "execution_id" in self.path_kwargs
        after: int | None = None
        drops = 0  # in a row, with no message in between
        while True:
            upstream = self._upstream
            assert upstream is not None
            while (message := await upstream.read_message()) is not None:
                drops = 0
                event = json.loads(message)
                if stream and isinstance(event, dict) and isinstance(event.get("seq"), int):
                    after = event["seq"]
                yield event
                if stream and isinstance(event, dict) and is_terminal_event(event):
                    return
            if upstream.close_code == 1000:
                if stream and after is not None:
                    # ended with nothing after `after`: a service killed after it sent an event
                    # but before it stored it numbers its recorded end at or below that seq;
                    # the client gets that end rather than a stream that never finishes
                    yield await self._recorded_end()
                return  # the service ended it
            why = f"closed with {upstream.close_code}" if upstream.close_code else "went away"
            drops += 1
            if not stream or drops > self.max_drops:
                raise ConnectionError(f"the crucible service's socket {why}")
            self.log.warning(
                "crucible: the service's stream of %s %s; reconnecting",
                self.path_kwargs["execution_id"],
                why,
            )
            self._upstream = await self._reconnect(after, why)

    async def _recorded_end(self) -> dict[str, Any]:
        """The terminal status event the service recorded for this stream's execution."""
        url = self.crucible.service_api_url + "executions/" + self.path_kwargs["execution_id"]
        request = HTTPRequest(
            url, headers=self.auth_headers(), connect_timeout=10, request_timeout=30
        )
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        if response.code != 200:
            raise ConnectionError(f"the crucible service answered {response.code} for {url}")
        events = json.loads(response.body).get("events") or []
        if not events or not is_terminal_event(events[-1]):
            raise ConnectionError("the crucible service closed the stream before its end")
        return events[-1]

    async def _reconnect(self, after: int | None, why: str) -> WebSocketClientConnection:
        """The stream again from the service, after ``after``; ConnectionError once it has not
        come back within ``service_timeout`` seconds or refuses for good."""
        url = self.service_url("ws")
        if after is not None:
            base, _, query = url.partition("?")
            kept = [p for p in query.split("&") if p and not p.startswith("after=")]
            url = base + "?" + "&".join([*kept, f"after={after}"])
        deadline = time.monotonic() + self.crucible.service_timeout
        last: Any = why
        while time.monotonic() < deadline:
            await asyncio.sleep(self.reconnect_interval)
            try:
                return await self._connect(url)
            except HTTPClientError as e:
                if e.response is not None and e.code not in (502, 503, 504, 599):
                    raise ConnectionError(  # refused for good (404: gone; 401/403)
                        f"the crucible service refused the stream again ({e.code})"
                    ) from None
                last = e
            except Exception as e:  # noqa: BLE001 -- refused connection: still down
                last = e
        raise ConnectionError(
            f"the crucible service's stream {why} and it did not come back within"
            f" {self.crucible.service_timeout:g} s (last: {last})"
        )

    def on_close(self) -> None:
        """Close the service's side too."""
        super().on_close()
        if self._upstream is not None:
            self._upstream.close()


def remote_handlers() -> list[tuple[str, type]]:
    """The routes of a server in remote mode (relative to the server's base URL)."""
    stream = r"crucible/api/executions/(?P<execution_id>[^/]+)/stream/?"
    return [
        (stream, RemoteSocket),
        (r"crucible/api/changes/?", RemoteSocket),
        (r"crucible/api(?P<path>/.*)?", RemoteAPIHandler),
    ]
