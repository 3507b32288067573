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

Each resource is one class here, host-neutral; :func:`routes` mounts them on a host's handler
bases, which decide who the caller is and what they may do at all (:mod:`.common`): the
Jupyter server extension (``crucible/api/`` under the server's base URL, jupyter_server's
authorizer: ``read`` for GET and the WebSockets, ``write`` for POST/DELETE) and the
standalone service (``{prefix}api/``, JupyterHub tokens). Both apply the owner rule: a
caller lists, reads, streams and cancels only their own executions (admins: all); another
user's execution id answers 404 like an unknown one. Queue depths count everyone's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from jupyter_server.utils import url_path_join

from .._version import __version__
from ..errors import InvalidRequest, NotFound
from .common import CrucibleRequestMixin, empty_stats
from .openapi import openapi_document
from .stream import ChangesAPI, ExecutionStreamAPI

_ID = r"(?P<execution_id>[^/]+)"


def _execution_json(execution: Any) -> dict[str, Any]:
    return execution.to_dict() if hasattr(execution, "to_dict") else dict(execution)


class ExecutionsAPI(CrucibleRequestMixin):
    """``executions``: submit a cell (POST) or list recorded executions (GET)."""

    async def post(self) -> None:
        """Submit: 201 with the queued execution and a Location header. The owner is the
        verified caller, never a value in the body (a ``user`` field is refused as unknown)."""
        await self.authorize("write")
        body = self.json_body()
        if isinstance(body, dict):
            body = await self._with_notebook_path(body)
        dispatcher = await self.dispatcher()
        execution = await dispatcher.submit(body, user=self.caller.name)
        location = url_path_join(self.crucible.api_root, "executions", execution.id)
        self.set_header("Location", location)
        self.write_json(_execution_json(execution), status=201)

    async def _with_notebook_path(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record the notebook as this server names it: when ``notebook.kernel_id`` is a kernel
        of one of this server's sessions, ``notebook.path`` is that session's path (relative
        to the server root, like the contents API), whatever the kernel guessed. A host
        without sessions (the standalone service) keeps what the client sent."""
        nb = body.get("notebook")
        sessions_of = getattr(self, "session_manager", None)
        if not isinstance(nb, dict) or not isinstance(nb.get("kernel_id"), str) or not sessions_of:
            return body
        try:
            sessions = await sessions_of.list_sessions()
        except Exception:  # noqa: BLE001 -- the sessions API is a convenience here, never a failure
            return body
        for session in sessions:
            if (session.get("kernel") or {}).get("id") == nb["kernel_id"] and session.get("path"):
                return {**body, "notebook": {**nb, "path": session["path"]}}
        return body

    async def get(self) -> None:
        """List: ``{"executions": [...], "next_cursor": str|null}``, the caller's own only
        (an admin's: everyone's, or ``?user=``'s)."""
        await self.authorize("read")
        self.only_query("user", "status", "tag", "since", "until", "cursor", "limit")
        page_max = self.crucible.max_page_size
        filters: dict[str, Any] = {
            "user": self.query_text("user"),
            "status": self.query_status(),
            "tag": self.query_tag(),
            "since": self.query_time("since"),
            "until": self.query_time("until"),
            "cursor": self.query_text("cursor", 512),
            "limit": self.query_int("limit", default=min(50, page_max), lo=1, hi=page_max),
        }
        since, until = filters["since"], filters["until"]
        if since is not None and until is not None and since > until:
            raise InvalidRequest("since must not be after until", field="since")
        filters["user"], none = self.user_filter(filters["user"])
        dispatcher = await self.dispatcher()
        page, next_cursor = ([], None) if none else await dispatcher.list(**filters)
        self.write_json(
            {"executions": [_execution_json(e) for e in page], "next_cursor": next_cursor}
        )


class ExecutionAPI(CrucibleRequestMixin):
    """``executions/{id}``: one execution with its events (GET), or cancel it (DELETE)."""

    async def get(self, execution_id: str) -> None:
        """The execution dict plus ``events`` (stored events after ``?after=SEQ``)."""
        await self.authorize("read")
        execution_id = self.execution_id(execution_id)
        self.only_query("after")
        after = self.query_int("after", default=-1, lo=-1, hi=2**53)
        dispatcher = await self.dispatcher()
        execution = await self.visible(dispatcher, execution_id)
        if execution.status.terminal:
            # the record turns terminal a moment before the terminal event is logged: wait
            # for it, so a finished execution always comes with its whole event log
            with contextlib.suppress(asyncio.TimeoutError):
                execution = await asyncio.wait_for(dispatcher.wait(execution_id), 5)
        events = await dispatcher.events(execution_id, after=after)
        self.write_json({**_execution_json(execution), "events": [e.to_dict() for e in events]})

    async def delete(self, execution_id: str) -> None:
        """Cancel; answers like POST executions/{id}/cancel."""
        await self.authorize("write")
        await _cancel(self, execution_id)


class CancelAPI(CrucibleRequestMixin):
    """``executions/{id}/cancel``: stop a queued or running execution."""

    async def post(self, execution_id: str) -> None:
        """200 with the execution (``cancelled`` once the backend confirms); 409 if finished."""
        await self.authorize("write")
        await _cancel(self, execution_id)


async def _cancel(handler: CrucibleRequestMixin, execution_id: str) -> None:
    execution_id = handler.execution_id(execution_id)
    dispatcher = await handler.dispatcher()
    await handler.visible(dispatcher, execution_id)  # someone else's: 404
    execution = await dispatcher.cancel(execution_id)
    handler.write_json(_execution_json(execution))


class QueueAPI(CrucibleRequestMixin):
    """``queue``: how busy the dispatcher is, and where one execution stands."""

    async def get(self) -> None:
        """Depth per priority, running, capacity (everyone's); ``position`` when
        ``?execution_id=`` names one of the caller's executions."""
        await self.authorize("read")
        self.only_query("execution_id")
        execution_id = self.query("execution_id")
        if execution_id:
            execution_id = self.execution_id(execution_id)
        dispatcher = await self.dispatcher()
        if execution_id:
            await self.visible(dispatcher, execution_id)  # 404 for an unknown id
        self.write_json(dispatcher.queue_status(execution_id=execution_id or None))


class StatsAPI(CrucibleRequestMixin):
    """``stats``: counts per status and durations, optionally for one user or a time window."""

    async def get(self) -> None:
        """The dispatcher's statistics for ``?user=`` since ``?since=`` (the caller's own
        executions only, unless an admin asks)."""
        await self.authorize("read")
        self.only_query("user", "since")
        user, none = self.user_filter(self.query_text("user"))
        since = self.query_time("since")
        dispatcher = await self.dispatcher()
        self.write_json(empty_stats() if none else await dispatcher.stats(user=user, since=since))


class HealthAPI(CrucibleRequestMixin):
    """``health``: 200 ``{"status": "ok"}`` when the dispatcher runs, else 503."""

    _track_activity = False

    async def get(self) -> None:
        """Liveness of the dispatcher, with the queue summary."""
        await self.authorize("read")
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


class OpenAPIDocument(CrucibleRequestMixin):
    """``openapi.json``: the OpenAPI 3.0 document of this API, with this server's base URL."""

    _track_activity = False

    async def get(self) -> None:
        """The document; ``servers`` points at this server's ``crucible/api`` root, and the
        bounds are this server's (the dispatcher's limits, ``max_page_size``)."""
        await self.authorize("read")
        self.write_json(
            openapi_document(
                self.crucible.api_root,
                self.crucible.dispatcher.limits,
                max_page_size=self.crucible.max_page_size,
                auth=self.auth_scheme,
            )
        )


class UnknownEndpoint(CrucibleRequestMixin):
    """Any other path under ``crucible/api/``: a JSON 404 that points at the API's document."""

    _track_activity = False

    async def _unknown(self, path: str = "") -> None:
        """404 naming the path and where the endpoints are listed."""
        self.authenticate()
        doc = url_path_join(self.crucible.api_root, "openapi.json")
        raise NotFound(
            f"there is no crucible API endpoint at {self.request.path[:200]!r};"
            f" the endpoints are listed in {doc}",
            field="path",
        )

    get = post = put = patch = delete = _unknown


def routes(root: str, rest_base: type, socket_base: type) -> list[tuple[str, type]]:
    """The API's routes under the URL pattern ``root`` (``crucible/api`` in the extension,
    ``/services/crucible/api`` in the service), each resource mounted on the host's
    ``rest_base`` (REST) or ``socket_base`` (WebSocket), which bring identity and
    authorization. One set of resource classes serves both hosts."""

    def mount(resource: type, base: type) -> type:
        name = resource.__name__.removesuffix("API") + "Handler"
        return type(name, (resource, base), {"__doc__": resource.__doc__})

    return [
        (rf"{root}/executions/?", mount(ExecutionsAPI, rest_base)),
        (rf"{root}/executions/{_ID}/cancel/?", mount(CancelAPI, rest_base)),
        (rf"{root}/executions/{_ID}/stream/?", mount(ExecutionStreamAPI, socket_base)),
        (rf"{root}/executions/{_ID}/?", mount(ExecutionAPI, rest_base)),
        (rf"{root}/changes/?", mount(ChangesAPI, socket_base)),
        (rf"{root}/queue/?", mount(QueueAPI, rest_base)),
        (rf"{root}/stats/?", mount(StatsAPI, rest_base)),
        (rf"{root}/health/?", mount(HealthAPI, rest_base)),
        (rf"{root}/openapi\.json", mount(OpenAPIDocument, rest_base)),
        (rf"{root}(?P<path>/.*)?", mount(UnknownEndpoint, rest_base)),
    ]


def default_handlers() -> list[tuple[str, type]]:
    """The routes of the Jupyter server extension (relative to the server's base URL)."""
    from .base import CrucibleAPIHandler
    from .stream import JupyterSocket

    return routes("crucible/api", CrucibleAPIHandler, JupyterSocket)
