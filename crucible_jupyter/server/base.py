"""What every crucible handler shares: identity, JSON errors mapped once, input parsing.

Errors: any :class:`~crucible_jupyter.errors.CrucibleError` raised by a handler (or by the
dispatcher under it) becomes a JSON response with the status from
:func:`~crucible_jupyter.errors.http_status` and the body
``{"error": kind, "message": ..., "field": ...}``. Tornado's own ``HTTPError`` (403 from the
authorizer, 405, ...) gets the same body shape. Nothing a client sends can produce a 500.

Identity: requests carrying the kernel credential (``X-Crucible-Token: <token>``, handed to
kernels the server starts as ``CRUCIBLE_TOKEN``) are accepted as the server's own user;
every other request goes through the server's configured identity provider unchanged.
"""

from __future__ import annotations

import hmac
import json
import re
from datetime import datetime, timezone
from http.client import responses
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..errors import CrucibleError, InvalidRequest, NotFound, RequestTooLarge, http_status
from ..models import Status

if TYPE_CHECKING:
    from .app import CrucibleApp

AUTH_RESOURCE = "crucible"
KERNEL_TOKEN_HEADER = "X-Crucible-Token"

#: What an execution id looks like (UUIDv7 text); anything else is a 404 without a lookup.
EXECUTION_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:/@+=-]{1,64}$")
#: Query parameters every endpoint tolerates: jupyter_server's own credentials.
_JUPYTER_QUERY = frozenset({"token", "_xsrf"})
#: Longest integer a request body may hold; no field takes a number anywhere near this long.
MAX_JSON_DIGITS = 1000


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (parsers disagree on which value wins)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
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


class KernelTokenIdentity:
    """Wraps the server's identity provider to also accept the kernel credential.

    A request whose ``X-Crucible-Token`` header equals the extension's kernel token is the
    server's user (``kernel_user``) and counts as token-authenticated (no XSRF cookie needed).
    Everything else is delegated unchanged.
    """

    def __init__(self, inner: Any, token: str, user: User) -> None:
        self._inner = inner
        self._token = token
        self._user = user

    def _matches(self, handler: web.RequestHandler) -> bool:
        given = handler.request.headers.get(KERNEL_TOKEN_HEADER, "")
        return bool(given and self._token) and hmac.compare_digest(
            given.encode("utf-8", "replace"), self._token.encode()
        )

    def get_user(self, handler: web.RequestHandler) -> Any:
        """The kernel user for a request with the kernel token, else the inner provider's user."""
        if self._matches(handler):
            return self._user
        return self._inner.get_user(handler)

    def is_token_authenticated(self, handler: web.RequestHandler) -> bool:
        """True for the kernel token and for whatever the inner provider calls token auth."""
        return self._matches(handler) or self._inner.is_token_authenticated(handler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CrucibleMixin(ExtensionHandlerMixin):
    """Shared by the REST handlers and the WebSocket handler of the ``crucible`` extension."""

    auth_resource = AUTH_RESOURCE

    @property
    def crucible(self) -> CrucibleApp:
        """The running :class:`~crucible_jupyter.server.app.CrucibleApp`."""
        return self.extensionapp  # type: ignore[return-value]

    @property
    def identity_provider(self) -> Any:  # type: ignore[override]
        """The server's identity provider, extended with the kernel credential."""
        return self.crucible.identity_for(super().identity_provider)  # type: ignore[misc]

    async def dispatcher(self) -> Any:
        """The started dispatcher; raises Unavailable (503) if it cannot start."""
        return await self.crucible.ready()

    @property
    def username(self) -> str:
        """The jupyter_server identity of the caller, as recorded on executions.

        jupyter_server's own identity provider knows no user names: it gives whoever logs in
        with the server's token or password (a browser, in a cookie) or sends the token (a
        script) a random anonymous identity, new for each login or request. Whoever holds
        that token is the server's own user, so those requests are recorded as
        ``kernel_user``, like the kernels', and history stays searchable by user. Real
        identities (JupyterHub's, a custom provider's) are recorded as they are.
        """
        user = self.current_user  # type: ignore[attr-defined]
        if str(getattr(user, "name", "")).startswith("Anonymous "):
            return self.crucible.kernel_user
        return getattr(user, "username", None) or str(user)

    # -- input parsing -------------------------------------------------------------------------

    def execution_id(self, value: str) -> str:
        """``value`` if it looks like an execution id, else NotFound (404)."""
        if not EXECUTION_ID_RE.match(value):
            raise NotFound(f"no execution with id {value[:80]!r}", field="id")
        return value

    def only_query(self, *names: str) -> None:
        """Refuse a query parameter this endpoint does not take, so a typo (``?state=``) is a
        400 rather than an unfiltered answer. jupyter_server's ``token`` and ``_xsrf`` pass, as
        does JupyterLab's cache-buster (a bare timestamp such as ``?1732890000123``)."""
        for name in self.request.query_arguments:  # type: ignore[attr-defined]
            if name in names or name in _JUPYTER_QUERY or (name.isascii() and name.isdigit()):
                continue
            takes = f"it takes {', '.join(names)}" if names else "it takes none"
            raise InvalidRequest(
                f"unknown query parameter {name[:40]!r} for {self.request.path[:200]};"  # type: ignore[attr-defined]
                f" {takes}",
                field=name[:64],
            )

    def query(self, name: str) -> str | None:
        """One query parameter as text, or None; repeated or undecodable values are a 400."""
        values = self.request.query_arguments.get(name)  # type: ignore[attr-defined]
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
        if not _TAG_RE.match(text):
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

    # -- errors, mapped once ---------------------------------------------------------------------

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Crucible errors are the caller's mistake or a known outage: log one line, no trace."""
        if isinstance(value, CrucibleError):
            level = self.log.warning if http_status(value) >= 500 else self.log.info  # type: ignore[attr-defined]
            level(
                "%s %s: %s %s", self.request.method, self.request.path, type(value).__name__, value
            )  # type: ignore[attr-defined]
            return
        super().log_exception(typ, value, tb)  # type: ignore[misc]

    def allowed_methods(self) -> list[str]:
        """The HTTP methods this handler answers (for 405 responses and their Allow header)."""
        return [
            m
            for m in ("GET", "POST", "DELETE")
            if getattr(type(self), m.lower(), None) is not getattr(web.RequestHandler, m.lower())
        ]

    def _refusal_before_handler(self, status_code: int) -> dict[str, str]:
        """What jupyter_server's bare 403 or 404 (raised before any crucible code runs) meant:
        a Host header that is not a local name, a cross-origin browser request, a stale kernel
        credential, or no credentials."""
        if status_code == 403 and not self.check_host():  # type: ignore[attr-defined]
            host = self.request.host[:100]  # type: ignore[attr-defined]
            message = (
                f"the Host header {host!r} is not a local name of this server, which refuses"
                " such requests (DNS-rebinding protection): connect by localhost or 127.0.0.1,"
                " or ask whoever runs the server to set ServerApp.allow_remote_access"
            )
            return {"error": "Forbidden", "message": message}
        if status_code == 404 and not self.check_origin():  # type: ignore[attr-defined]
            origin = self.request.headers.get("Origin", "")[:200]  # type: ignore[attr-defined]
            message = (
                f"cross-origin request from {origin!r} refused: this server does not allow"
                " that origin (ServerApp.allow_origin); call the API from a page the server"
                " itself serves, or authenticate with 'Authorization: token <token>'"
            )
            return {"error": "NotFound", "message": message}
        if status_code == 403 and self.request.headers.get(KERNEL_TOKEN_HEADER):  # type: ignore[attr-defined]
            message = (
                f"not authenticated: the {KERNEL_TOKEN_HEADER} header is not this server's"
                " kernel credential, which is new each time the server starts; restart the"
                " kernel to get the current one (CRUCIBLE_TOKEN), or send the server's token"
                " (header 'Authorization: token <token>')"
            )
            return {"error": "Forbidden", "message": message}
        if status_code == 403:
            message = (
                "not authenticated: send the Jupyter server's token"
                " (header 'Authorization: token <token>'), or log in to the server first"
            )
            return {"error": "Forbidden", "message": message}
        return {"error": "NotFound", "message": f"nothing at {self.request.path[:200]!r}"}  # type: ignore[attr-defined]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error is JSON: ``{"error", "message", "field"?}`` with a precise status code."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, CrucibleError):
            status_code = http_status(exc)
            self.set_status(status_code)  # type: ignore[attr-defined]
            body = exc.to_dict()
        elif isinstance(exc, web.HTTPError) and status_code == 405 and self.allowed_methods():
            allowed = self.allowed_methods()
            self.set_header("Allow", ", ".join(allowed))  # type: ignore[attr-defined]
            body = {
                "error": "MethodNotAllowed",
                "message": f"{self.request.method} is not allowed on {self.request.path};"  # type: ignore[attr-defined]
                f" use {' or '.join(allowed)}",
            }
        elif isinstance(exc, web.HTTPError) and not exc.log_message and status_code in (403, 404):
            body = self._refusal_before_handler(status_code)
        elif isinstance(exc, web.HTTPError):
            reason = exc.reason or responses.get(status_code, "Error")
            message = exc.log_message or reason
            if status_code == 403 and "_xsrf" in message:
                message += (
                    ": a request authenticated by a browser login cookie must also send the"
                    " value of the '_xsrf' cookie in an 'X-XSRFToken' header (JupyterLab does"
                    " this); scripts should send 'Authorization: token <token>' instead"
                )
            if status_code == 403 and "not authorized" in message:
                message += (
                    f" The server's authorizer decides this (resource {AUTH_RESOURCE!r}:"
                    " read to list and view, write to submit and cancel, execute to stream);"
                    " ask whoever runs this Jupyter server for the permission."
                )
            body = {"error": reason.replace(" ", ""), "message": message}
        else:
            body = {"error": "InternalError", "message": "Unhandled error; see the server log"}
        body.setdefault("reason", responses.get(status_code, "Error"))
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps(body))  # type: ignore[attr-defined]


class CrucibleAPIHandler(CrucibleMixin, APIHandler):
    """Base of the REST handlers: JSON in, JSON out."""

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
