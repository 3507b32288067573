"""The WebSockets of the API: live events of one execution, and status changes of all.

``executions/{id}/stream?after=SEQ``: after the upgrade, the server sends every event with
``seq > after`` as one JSON text message each (``Event.to_dict()``), first the stored ones the
client missed, then live ones as they happen, and closes with code 1000 right after the
terminal status event. A client that reconnects with the last ``seq`` it saw misses nothing
and sees nothing twice.

``changes``: one message ``{"id", "status", "user"}`` each time an execution of this server
that the caller may see (their own; an admin's: all) is queued, starts, runs or ends (sent
once the stored record says so: fetching it then shows the new status), so a history view
can stay current without polling; ``{"overflow": true}`` when the client read too slowly and
lost some. Open until the server stops.

A client that reads slowly costs the server a bounded amount of memory and never holds up an
execution (the dispatcher's subscription is bounded: past it, what the client missed is read
again from storage); one that takes nothing for ``write_stall_seconds`` (60 s) is
disconnected with code 1008, and reconnects with ``after`` set to the last ``seq`` it got.

The server never reads from these sockets; messages a client sends are ignored. Refusals
happen before the upgrade, as JSON HTTP errors: 401/403 (not authenticated, or not authorized
for ``read`` on ``crucible`` / no access to the service), 404 (unknown execution, or another
user's), 400 (bad ``after``, another query parameter, or not a WebSocket request).

The socket logic here is host-neutral; :class:`JupyterSocket` mounts it on jupyter_server
(the service mounts it on its own base, see :func:`.handlers.routes`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from ..errors import InvalidRequest
from .base import CrucibleMixin
from .common import CrucibleRequestMixin

if TYPE_CHECKING:  # what the socket mixin is mixed into (before it), as the type checker sees it
    _Socket = WebSocketHandler
else:
    _Socket = object


class _CrucibleSocket(CrucibleRequestMixin, _Socket):
    """A server-to-client WebSocket: relays what :meth:`relay` yields, one JSON message each.
    Mixed before a host's WebSocket base (which brings tornado's WebSocketHandler)."""

    _pump: asyncio.Task | None = None
    endpoint = ""
    #: Seconds one message may wait for a client that reads nothing before it is dropped.
    write_stall_seconds = 60.0

    def set_default_headers(self) -> None:
        """No HTML security headers on a WebSocket handshake."""

    def require_upgrade(self, plain_http: str) -> None:
        """InvalidRequest (400) unless this is a WebSocket handshake."""
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise InvalidRequest(
                f"this endpoint is a WebSocket: connect with 'Upgrade: websocket' ({plain_http})",
                field="Upgrade",
            )

    def open(self, *args: Any, **kwargs: Any) -> None:
        """Start relaying."""
        super().open()
        self._pump = asyncio.ensure_future(self._relay())

    def relay(self) -> AsyncIterator[dict]:
        """The messages to send; the socket closes (1000) when it ends."""
        raise NotImplementedError

    async def _relay(self) -> None:
        try:
            async for message in self.relay():
                # awaiting the write holds this relay (not the loop) while the client is slow;
                # a client that takes nothing at all is let go
                await asyncio.wait_for(
                    self.write_message(json.dumps(message)), self.write_stall_seconds
                )
        except (WebSocketClosedError, asyncio.CancelledError):
            return
        except asyncio.TimeoutError:
            self.log.warning(
                "crucible %s: the client read nothing for %g s; disconnected",
                self.request.path,
                self.write_stall_seconds,
            )
            self.close(1008, f"too slow: read nothing for {self.write_stall_seconds:g} s")
            return
        except Exception as e:  # noqa: BLE001 -- the dispatcher failed: say so, do not hang the client
            self.log.warning("crucible %s failed: %s", self.request.path, e)
            self.close(1011, f"failed; {self.endpoint}")
            return
        self.close(1000, "finished")

    def on_message(self, message: Any) -> None:
        """Messages from the client are ignored."""

    def on_close(self) -> None:
        """Stop relaying when the client goes away."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()


class ExecutionStreamAPI(_CrucibleSocket):
    """WebSocket that relays one execution's events until its terminal status."""

    endpoint = "fetch GET executions/{id} for the stored events"

    async def get(self, execution_id: str) -> None:
        """Validate, check the execution exists and is the caller's, then upgrade."""
        await self.authorize("read")
        self.execution_id_value = self.execution_id(execution_id)
        self.only_query("after")
        self.after = self.query_int("after", default=-1, lo=-1, hi=2**53)
        self.require_upgrade("GET executions/{id} returns the stored events over plain HTTP")
        self._dispatcher = await self.dispatcher()
        await self.visible(self._dispatcher, self.execution_id_value)  # 404 before the upgrade
        await super().get(execution_id)

    async def relay(self) -> AsyncIterator[dict]:
        """Every event after ``after``, up to the terminal status."""
        async for event in self._dispatcher.subscribe(self.execution_id_value, after=self.after):
            yield event.to_dict()


class ChangesAPI(_CrucibleSocket):
    """WebSocket that tells of status changes of the caller's executions (an admin's: all)
    while the server runs."""

    endpoint = "reconnect, or list GET executions"

    async def get(self) -> None:
        """Validate, then upgrade."""
        await self.authorize("read")
        self.only_query()
        self.require_upgrade("GET executions lists them over plain HTTP")
        self._dispatcher = await self.dispatcher()
        self._caller = self.caller
        await super().get()

    async def relay(self) -> AsyncIterator[dict]:
        """The dispatcher's change notices the caller may see (overflow notices too)."""
        caller = self._caller
        async for notice in self._dispatcher.changes():
            if caller.admin or "id" not in notice or notice.get("user") == caller.name:
                yield notice


# jupyter_server's ExtensionHandlerMixin and JupyterHandler type config, serverapp and settings
# differently; every handler that mixes them (as extensions must) meets that.
class JupyterSocket(CrucibleMixin, WebSocketMixin, WebSocketHandler, JupyterHandler):  # type: ignore[misc, override]
    """The jupyter_server base of the API's WebSockets."""
