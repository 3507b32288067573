"""What every crucible API handler shares, whichever process serves it.

The API (:mod:`.handlers`, :mod:`.stream`) is one set of resource classes mounted on two
hosts, which differ only in who the caller is and what they may do:

* the Jupyter server extension (:mod:`.base`): jupyter_server's identity provider and
  authorizer (resource ``crucible``), plus the kernel credential;
* the standalone service ``crucible serve`` (:mod:`crucible_jupyter.service`): JupyterHub
  tokens checked with ``jupyterhub.services.auth.HubAuth``.

A host mixes :class:`CrucibleRequestMixin` into its tornado handler base and provides
``crucible`` (the running app: ``dispatcher``, ``ready()``, ``api_root``,
``max_body_bytes``, ``max_page_size``), ``caller`` (a :class:`Caller`), ``authenticate()``
and ``authorize(action)``.

Errors: any :class:`~crucible_jupyter.errors.CrucibleError` raised by a handler (or by the
dispatcher under it) becomes a JSON response with the status from
:func:`~crucible_jupyter.errors.http_status` and the body
``{"error": kind, "message": ..., "field": ...}``. Tornado's own ``HTTPError`` gets the same
body shape. Nothing a client sends can produce a 500.

Owner rule: a caller sees, streams and cancels the executions recorded under their own name;
an admin caller sees all. Another caller's execution answers exactly like an unknown id
(404), so its existence is not leaked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from http.client import responses
from typing import TYPE_CHECKING, Any

from tornado import web

from ..errors import CrucibleError, InvalidRequest, NotFound, RequestTooLarge, http_status
from ..models import Execution, Status
from ..protocol import is_tag
from ..storage.values import not_found

#: What an execution id looks like (UUIDv7 text); anything else is a 404 without a lookup.
EXECUTION_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Query parameters every endpoint tolerates: jupyter_server's (and JupyterHub's) credentials.
_JUPYTER_QUERY = frozenset({"token", "_xsrf"})
#: Longest integer a request body may hold; no field takes a number anywhere near this long.
MAX_JSON_DIGITS = 1000


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the host verified it: ``name`` is recorded as the owner of what
    they submit; ``admin`` callers see and cancel every execution."""

    name: str
    admin: bool = False

    def may_see(self, execution: Execution) -> bool:
        """Whether this caller may read, stream or cancel ``execution``."""
        return self.admin or execution.user == self.name


def empty_stats() -> dict[str, Any]:
    """Statistics of no executions (what a filter that matches nothing gives)."""
    return {
        "total": 0,
        "by_status": {s.value: 0 for s in Status},
        "duration_ms": {"p50": None, "p95": None, "count": 0},
    }


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (parsers disagree on which value wins)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for twice, _ in pairs:  # the first key met a second time
            if twice in seen:
                break
            seen.add(twice)
        raise InvalidRequest(
            f"the request body gives the key {twice[:80]!r} more than once in one object;"
            " give each key once",
            field=twice[:64],
        )
    return obj


def _json_int(text: str) -> int:
    """A JSON integer, refusing absurdly long ones with a message (not Python's own)."""
    if len(text) > MAX_JSON_DIGITS:
        raise InvalidRequest(
            f"the request body holds an integer of {len(text)} digits;"
            f" numbers may have at most {MAX_JSON_DIGITS}",
            field="body",
        )
    return int(text)


def decode_json(body: bytes) -> Any:
    """``body`` decoded as JSON; InvalidRequest (400) saying why it is not acceptable JSON."""
    try:
        return json.loads(body, object_pairs_hook=_json_object, parse_int=_json_int)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}", field="body") from None


if TYPE_CHECKING:  # what the mixin is mixed into (before it), as the type checker sees it
    import logging

    class _Handler(web.RequestHandler):
        log: logging.Logger  # jupyter_server's and JupyterHub's handlers both have one
else:
    _Handler = object


class CrucibleRequestMixin(_Handler):
    """Input parsing, the owner rule and JSON errors, shared by both hosts' handlers."""

    # -- what the host provides ------------------------------------------------------------------

    @property
    def crucible(self) -> Any:
        """The running app (CrucibleApp or CrucibleService)."""
        raise NotImplementedError

    @property
    def caller(self) -> Caller:
        """The verified caller of this request."""
        raise NotImplementedError

    def authenticate(self) -> None:
        """Refuse the request unless its caller is known."""
        raise NotImplementedError

    async def authorize(self, action: str) -> None:
        """Refuse the request unless the caller may ``action`` (read, write) at all."""
        raise NotImplementedError

    #: Which authentication the OpenAPI document describes: "jupyter" or "hub".
    auth_scheme = "jupyter"

    async def dispatcher(self) -> Any:
        """The started dispatcher; raises Unavailable (503) if it cannot start."""
        return await self.crucible.ready()

    # -- the owner rule --------------------------------------------------------------------------

    async def visible(self, dispatcher: Any, execution_id: str) -> Execution:
        """The execution, if the caller may see it; else the very NotFound an unknown id gets."""
        execution = await dispatcher.get(execution_id)
        if not self.caller.may_see(execution):
            raise not_found(execution_id)
        return execution

    def user_filter(self, requested: str | None) -> tuple[str | None, bool]:
        """``(user to filter on, nothing can match)`` for a ``?user=`` filter: an admin's is
        kept; anyone else only ever sees their own (asking for another user matches none)."""
        caller = self.caller
        if caller.admin:
            return requested, False
        return caller.name, requested is not None and requested != caller.name

    # -- input parsing -------------------------------------------------------------------------

    def execution_id(self, value: str) -> str:
        """``value`` if it looks like an execution id, else NotFound (404)."""
        if not EXECUTION_ID_RE.fullmatch(value):
            raise NotFound(f"no execution with id {value[:80]!r}", field="id")
        return value

    def only_query(self, *names: str) -> None:
        """Refuse a query parameter this endpoint does not take, so a typo (``?state=``) is a
        400 rather than an unfiltered answer. ``token`` and ``_xsrf`` pass, as does
        JupyterLab's cache-buster (a bare timestamp such as ``?1732890000123``)."""
        for name in self.request.query_arguments:
            if name in names or name in _JUPYTER_QUERY or (name.isascii() and name.isdigit()):
                continue
            takes = f"it takes {', '.join(names)}" if names else "it takes none"
            raise InvalidRequest(
                f"unknown query parameter {name[:40]!r} for {self.request.path[:200]}; {takes}",
                field=name[:64],
            )

    def query(self, name: str) -> str | None:
        """One query parameter as text, or None; repeated or undecodable values are a 400."""
        values = self.request.query_arguments.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise InvalidRequest(f"query parameter {name!r} was given more than once", field=name)
        try:
            text = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(
                f"query parameter {name!r} is not UTF-8 text", field=name
            ) from None
        if "\x00" in text:
            raise InvalidRequest(f"query parameter {name!r} contains a NUL byte", field=name)
        return text

    def query_int(self, name: str, *, default: int | None, lo: int, hi: int) -> int | None:
        """An integer query parameter in ``[lo, hi]``, or ``default`` when absent."""
        text = self.query(name)
        if text is None or text == "":
            return default
        if not re.fullmatch(r"-?[0-9]{1,20}", text):  # int() would take " 1_0 " or "١٢"
            raise InvalidRequest(f"{name} must be an integer, not {text[:40]!r}", field=name)
        value = int(text)
        if not lo <= value <= hi:
            raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}", field=name)
        return value

    def query_time(self, name: str) -> int | None:
        """A time filter: milliseconds since the epoch or an ISO 8601 date/time (UTC if naive)."""
        text = self.query(name)
        if text is None or text == "":
            return None
        if re.fullmatch(r"-?[0-9]{1,16}", text):
            return int(text)
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequest(
                f"{name} must be milliseconds since the epoch or an ISO 8601 time such as"
                f" 2025-01-31T12:00:00Z, not {text[:40]!r}",
                field=name,
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return int(when.timestamp() * 1000)

    def query_status(self, name: str = "status") -> str | None:
        """A status filter: one of the execution states."""
        text = self.query(name)
        if text is None or text == "":
            return None
        allowed = [s.value for s in Status]
        if text not in allowed:
            raise InvalidRequest(
                f"status must be one of {', '.join(allowed)}; got {text[:40]!r}", field=name
            )
        return text

    def query_tag(self, name: str = "tag") -> str | None:
        """A tag filter, with the same rules as tags on requests."""
        text = self.query(name)
        if text is None or text == "":
            return None
        if not is_tag(text):
            raise InvalidRequest(
                f"tag {text[:70]!r} is invalid: use 1-64 letters, digits or . _ - : / @ + =",
                field=name,
            )
        return text

    def query_text(self, name: str, max_len: int = 256) -> str | None:
        """A free-text query parameter of at most ``max_len`` characters."""
        text = self.query(name)
        if text is None or text == "":
            return None
        if len(text) > max_len:
            raise InvalidRequest(f"{name} must be at most {max_len} characters", field=name)
        return text

    def json_body(self) -> Any:
        """The decoded JSON request body; 413 over the size limit, 400 if it is not JSON."""
        body = self.request.body or b""
        limit = self.crucible.max_body_bytes
        if len(body) > limit:
            raise RequestTooLarge(
                f"request body is {len(body)} bytes, over the limit of {limit} bytes", field="body"
            )
        if not body.strip():
            raise InvalidRequest("the request body is empty; send a JSON object", field="body")
        return decode_json(body)

    def write_json(self, data: Any, status: int = 200) -> None:
        """Finish the request with ``data`` as JSON."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))

    # -- errors, mapped once ---------------------------------------------------------------------

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Crucible errors are the caller's mistake or a known outage: log one line, no trace."""
        if isinstance(value, CrucibleError):
            level = self.log.warning if http_status(value) >= 500 else self.log.info
            level(
                "%s %s: %s %s", self.request.method, self.request.path, type(value).__name__, value
            )
            return
        super().log_exception(typ, value, tb)

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler answers (for 405 responses and their Allow header)."""
        return [
            m
            for m in ("GET", "POST", "DELETE")
            if getattr(type(self), m.lower(), None) is not getattr(web.RequestHandler, m.lower())
        ]

    def describe_http_error(self, status_code: int, exc: web.HTTPError) -> dict[str, str] | None:
        """The host's JSON body for a bare tornado HTTPError it raised itself, or None."""
        return None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error is JSON: ``{"error", "message", "field"?}`` with a precise status code."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        body: dict[str, Any] | None = None
        if isinstance(exc, CrucibleError):
            status_code = http_status(exc)
            self.set_status(status_code)
            body = exc.to_dict()
            for name, value in getattr(exc, "headers", {}).items():
                self.set_header(name, value)
        elif isinstance(exc, web.HTTPError) and status_code == 405 and self.allowed_methods():
            allowed = self.allowed_methods()
            self.set_header("Allow", ", ".join(allowed))
            body = {
                "error": "MethodNotAllowed",
                "message": f"{self.request.method} is not allowed on {self.request.path};"
                f" use {' or '.join(allowed)}",
            }
        elif isinstance(exc, web.HTTPError):
            body = self.describe_http_error(status_code, exc)
            if body is None:
                reason = exc.reason or responses.get(status_code, "Error")
                body = {"error": reason.replace(" ", ""), "message": exc.log_message or reason}
        else:
            body = {"error": "InternalError", "message": "Unhandled error; see the server log"}
        body.setdefault("reason", responses.get(status_code, "Error"))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))
