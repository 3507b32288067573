"""REST handlers of the crucible API, one class per resource, all under ``crucible/api/``.

=======================================  ======  =============================================
path                                     method  promise
=======================================  ======  =============================================
executions                               POST    validate, persist ``queued``; 201 + Location
executions                               GET     a page of executions, newest first, + cursor
executions/{id}                          GET     the execution and its stored events
executions/{id}                          DELETE  cancel (same as POST .../cancel)
executions/{id}/cancel                   POST    cancel; 409 if it already finished
executions/{id}/stream                   GET     WebSocket of events (see :mod:`.stream`)
queue                                    GET     depth per priority, running, capacity, position
stats                                    GET     counts and durations
health                                   GET     200 when the dispatcher is up, else 503
openapi.json                             GET     the OpenAPI 3 description of all of this
=======================================  ======  =============================================

Every handler is authenticated (``@web.authenticated``) and authorized against the server's
authorizer on resource ``crucible`` (``read`` for GET, ``write`` for POST/DELETE,
``execute`` for the WebSocket).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from .. import __version__
from ..errors import InvalidRequest, NotFound
from .base import CrucibleAPIHandler
from .openapi import openapi_document
from .stream import ChangesHandler, ExecutionStreamHandler

_ID = r"(?P<execution_id>[^/]+)"


def _execution_json(execution: Any) -> dict[str, Any]:
    return execution.to_dict() if hasattr(execution, "to_dict") else dict(execution)


class ExecutionsHandler(CrucibleAPIHandler):
    """``executions``: submit a cell (POST) or list recorded executions (GET)."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        """Submit: 201 with the queued execution and a Location header."""
        body = self.json_body()
        if isinstance(body, dict):
            body = await self._with_notebook_path(body)
        dispatcher = await self.dispatcher()
        execution = await dispatcher.submit(body, user=self.username)
        location = url_path_join(self.base_url, "crucible/api/executions", execution.id)
        self.set_header("Location", location)
        self.write_json(_execution_json(execution), status=201)

    async def _with_notebook_path(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record the notebook as this server names it: when ``notebook.kernel_id`` is a kernel
        of one of this server's sessions, ``notebook.path`` is that session's path (relative
        to the server root, like the contents API), whatever the kernel guessed."""
        nb = body.get("notebook")
        if not isinstance(nb, dict) or not isinstance(nb.get("kernel_id"), str):
            return body
        try:
            sessions = await self.session_manager.list_sessions()
        except Exception:  # the sessions API is a convenience here, never a failure
            return body
        for session in sessions:
            if (session.get("kernel") or {}).get("id") == nb["kernel_id"] and session.get("path"):
                return {**body, "notebook": {**nb, "path": session["path"]}}
        return body

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """List: ``{"executions": [...], "next_cursor": str|null}``."""
        self.only_query("user", "status", "tag", "since", "until", "cursor", "limit")
        page_max = self.crucible.max_page_size
        filters = {
            "user": self.query_text("user"),
            "status": self.query_status(),
            "tag": self.query_tag(),
            "since": self.query_time("since"),
            "until": self.query_time("until"),
            "cursor": self.query_text("cursor", 512),
            "limit": self.query_int("limit", default=min(50, page_max), lo=1, hi=page_max),
        }
        if filters["since"] is not None and filters["until"] is not None:
            if filters["since"] > filters["until"]:
                raise InvalidRequest("since must not be after until", field="since")
        dispatcher = await self.dispatcher()
        page, next_cursor = await dispatcher.list(**filters)
        self.write_json(
            {"executions": [_execution_json(e) for e in page], "next_cursor": next_cursor}
        )


class ExecutionHandler(CrucibleAPIHandler):
    """``executions/{id}``: one execution with its events (GET), or cancel it (DELETE)."""

    @web.authenticated
    @authorized
    async def get(self, execution_id: str) -> None:
        """The execution dict plus ``events`` (stored events after ``?after=SEQ``)."""
        execution_id = self.execution_id(execution_id)
        self.only_query("after")
        after = self.query_int("after", default=-1, lo=-1, hi=2**53)
        dispatcher = await self.dispatcher()
        execution = await dispatcher.get(execution_id)
        if execution.status.terminal:
            # the record turns terminal a moment before the terminal event is logged: wait
            # for it, so a finished execution always comes with its whole event log
            with contextlib.suppress(asyncio.TimeoutError):
                execution = await asyncio.wait_for(dispatcher.wait(execution_id), 5)
        events = await dispatcher.events(execution_id, after=after)
        self.write_json({**_execution_json(execution), "events": [e.to_dict() for e in events]})

    @web.authenticated
    @authorized
    async def delete(self, execution_id: str) -> None:
        """Cancel; answers like POST executions/{id}/cancel."""
        await _cancel(self, execution_id)


class CancelHandler(CrucibleAPIHandler):
    """``executions/{id}/cancel``: stop a queued or running execution."""

    @web.authenticated
    @authorized
    async def post(self, execution_id: str) -> None:
        """200 with the execution (``cancelled`` once the backend confirms); 409 if finished."""
        await _cancel(self, execution_id)


async def _cancel(handler: CrucibleAPIHandler, execution_id: str) -> None:
    execution_id = handler.execution_id(execution_id)
    dispatcher = await handler.dispatcher()
    execution = await dispatcher.cancel(execution_id)
    handler.write_json(_execution_json(execution))


class QueueHandler(CrucibleAPIHandler):
    """``queue``: how busy the dispatcher is, and where one execution stands."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Depth per priority, running, capacity; ``position`` when ``?execution_id=`` is given."""
        self.only_query("execution_id")
        execution_id = self.query("execution_id")
        if execution_id:
            execution_id = self.execution_id(execution_id)
        dispatcher = await self.dispatcher()
        if execution_id:
            await dispatcher.get(execution_id)  # 404 for an unknown id
        self.write_json(dispatcher.queue_status(execution_id=execution_id or None))


class StatsHandler(CrucibleAPIHandler):
    """``stats``: counts per status and durations, optionally for one user or a time window."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """The dispatcher's statistics for ``?user=`` since ``?since=``."""
        self.only_query("user", "since")
        user = self.query_text("user")
        since = self.query_time("since")
        dispatcher = await self.dispatcher()
        self.write_json(await dispatcher.stats(user=user, since=since))


class HealthHandler(CrucibleAPIHandler):
    """``health``: 200 ``{"status": "ok"}`` when the dispatcher runs, else 503."""

    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Liveness of the dispatcher, with the queue summary."""
        dispatcher = await self.dispatcher()
        await dispatcher.list(limit=1)  # storage answers (else 503)
        self.write_json(
            {
                "status": "ok",
                "version": __version__,
                "busy": bool(dispatcher.busy),
                "queue": dispatcher.queue_status(),
            }
        )


class OpenAPIHandler(CrucibleAPIHandler):
    """``openapi.json``: the OpenAPI 3.0 document of this API, with this server's base URL."""

    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        """The document; ``servers`` points at this server's ``crucible/api`` root, and the
        bounds are this server's (the dispatcher's limits, ``max_page_size``)."""
        self.write_json(
            openapi_document(
                url_path_join(self.base_url, "crucible/api"),
                self.crucible.dispatcher.limits,
                max_page_size=self.crucible.max_page_size,
            )
        )


class UnknownEndpointHandler(CrucibleAPIHandler):
    """Any other path under ``crucible/api/``: a JSON 404 that points at the API's document."""

    _track_activity = False

    @web.authenticated
    async def _unknown(self, path: str = "") -> None:
        """404 naming the path and where the endpoints are listed."""
        doc = url_path_join(self.base_url, "crucible/api/openapi.json")
        raise NotFound(
            f"there is no crucible API endpoint at {self.request.path[:200]!r};"
            f" the endpoints are listed in {doc}",
            field="path",
        )

    get = post = put = patch = delete = _unknown


default_handlers = [
    (r"crucible/api/executions/?", ExecutionsHandler),
    (rf"crucible/api/executions/{_ID}/cancel/?", CancelHandler),
    (rf"crucible/api/executions/{_ID}/stream/?", ExecutionStreamHandler),
    (rf"crucible/api/executions/{_ID}/?", ExecutionHandler),
    (r"crucible/api/changes/?", ChangesHandler),
    (r"crucible/api/queue/?", QueueHandler),
    (r"crucible/api/stats/?", StatsHandler),
    (r"crucible/api/health/?", HealthHandler),
    (r"crucible/api/openapi\.json", OpenAPIHandler),
    (r"crucible/api(?P<path>/.*)?", UnknownEndpointHandler),
]
