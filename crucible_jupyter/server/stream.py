"""``executions/{id}/stream?after=SEQ``: the live events of one execution over a WebSocket.

Promise: after the upgrade, the server sends every event with ``seq > after`` as one JSON text
message each (``Event.to_dict()``), first the stored ones the client missed, then live ones as
they happen, and closes with code 1000 right after the terminal status event. A client that
reconnects with the last ``seq`` it saw misses nothing and sees nothing twice. The server
never reads from the socket; messages a client sends are ignored.

Refusals happen before the upgrade, as JSON HTTP errors: 403 (not authenticated or not
authorized for ``read`` on ``crucible``), 404 (unknown execution), 400 (bad ``after``, another
query parameter, or not a WebSocket request).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from ..errors import InvalidRequest
from .base import CrucibleMixin


class ExecutionStreamHandler(CrucibleMixin, WebSocketMixin, WebSocketHandler, JupyterHandler):
    """WebSocket that relays one execution's events until its terminal status."""

    _pump: asyncio.Task | None = None

    def set_default_headers(self) -> None:
        """No HTML security headers on a WebSocket handshake."""

    @ws_authenticated
    @authorized(action="read")
    async def get(self, execution_id: str) -> None:  # type: ignore[override]
        """Validate, check the execution exists, then upgrade."""
        self.execution_id_value = self.execution_id(execution_id)
        self.only_query("after")
        self.after = self.query_int("after", default=-1, lo=-1, hi=2**53)
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise InvalidRequest(
                "this endpoint is a WebSocket: connect with 'Upgrade: websocket'"
                " (GET executions/{id} returns the stored events over plain HTTP)",
                field="Upgrade",
            )
        self._dispatcher = await self.dispatcher()
        await self._dispatcher.get(self.execution_id_value)  # 404 before the upgrade
        await super().get(execution_id)

    def open(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Start relaying events."""
        super().open()
        self._pump = asyncio.ensure_future(self._relay())

    async def _relay(self) -> None:
        try:
            async for event in self._dispatcher.subscribe(
                self.execution_id_value, after=self.after
            ):
                await self.write_message(json.dumps(event.to_dict()))
        except (WebSocketClosedError, asyncio.CancelledError):
            return
        except Exception as e:  # the dispatcher failed: say so, do not hang the client
            self.log.warning("crucible stream %s failed: %s", self.execution_id_value, e)
            self.close(1011, "stream failed; fetch GET executions/{id} for the stored events")
            return
        self.close(1000, "execution finished")

    def on_message(self, message: Any) -> None:
        """Messages from the client are ignored."""

    def on_close(self) -> None:
        """Stop relaying when the client goes away."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
