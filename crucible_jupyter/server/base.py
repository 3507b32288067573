"""The Jupyter server host of the crucible API: jupyter_server's identity and authorizer.

Identity: requests carrying the kernel credential (``X-Crucible-Token: <token>``, handed to
kernels the server starts as ``CRUCIBLE_TOKEN``) are accepted as the server's own user;
every other request goes through the server's configured identity provider unchanged
(:mod:`.identity`).

Authorization: the server's authorizer on resource ``crucible`` (``read`` to list, view and
stream, ``write`` to submit and cancel); then the owner rule of :mod:`.common`, where the
server's own user (``CrucibleApp.kernel_user``, whom the server's token identifies) is the
admin of this server's executions and any other identity (a JupyterHub collaborator, a
custom identity provider's user) sees only their own.
"""

from __future__ import annotations

from http.client import responses
from typing import TYPE_CHECKING, Any

from jupyter_core.utils import ensure_async
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..protocol import KERNEL_TOKEN_HEADER  # also imported from here by tests
from .common import (  # noqa: F401 - re-exported: the API's helpers lived here before
    EXECUTION_ID_RE,
    MAX_JSON_DIGITS,
    Caller,
    CrucibleRequestMixin,
    decode_json,
)

if TYPE_CHECKING:
    from .app import CrucibleApp

AUTH_RESOURCE = "crucible"


# jupyter_server's ExtensionHandlerMixin types config, serverapp and settings unlike tornado's
# and JupyterHandler's; every class that mixes them (as extensions must) meets that clash.
class CrucibleMixin(CrucibleRequestMixin, ExtensionHandlerMixin):  # type: ignore[override]
    """The jupyter_server host of the crucible API's handlers (REST and WebSocket)."""

    auth_resource = AUTH_RESOURCE
    auth_scheme = "jupyter"

    @property
    def crucible(self) -> CrucibleApp:
        """The running :class:`~crucible_jupyter.server.app.CrucibleApp`."""
        return self.extensionapp  # type: ignore[return-value]

    @property
    def identity_provider(self) -> Any:
        """The server's identity provider, extended with the kernel credential."""
        return self.crucible.identity_for(super().identity_provider)  # type: ignore[misc]

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
        user = self.current_user
        if str(getattr(user, "name", "")).startswith("Anonymous "):
            return self.crucible.kernel_user
        return getattr(user, "username", None) or str(user)

    @property
    def caller(self) -> Caller:
        """The caller; the server's own user is the admin of this server's executions."""
        name = self.username
        return Caller(name, admin=name == self.crucible.kernel_user)

    def authenticate(self) -> None:
        """403 (bare: see :meth:`describe_http_error`) unless the request has a user."""
        if not self.current_user:
            raise web.HTTPError(403)

    async def authorize(self, action: str) -> None:
        """What jupyter_server's ``@authorized`` does: ask the server's authorizer whether
        the caller may ``action`` on resource ``crucible``; 403 if not."""
        self.authenticate()
        message = f"User is not authorized to {action} on resource: {AUTH_RESOURCE}."
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, action, AUTH_RESOURCE)  # type: ignore[attr-defined]
        )
        if not allowed:
            raise web.HTTPError(status_code=403, log_message=message)

    def _refusal_before_handler(self, status_code: int) -> dict[str, str]:
        """What jupyter_server's bare 403 or 404 (raised before any crucible code runs) meant:
        a Host header that is not a local name, a cross-origin browser request, a stale kernel
        credential, or no credentials."""
        if status_code == 403 and not self.check_host():  # type: ignore[attr-defined]
            host = self.request.host[:100]
            message = (
                f"the Host header {host!r} is not a local name of this server, which refuses"
                " such requests (DNS-rebinding protection): connect by localhost or 127.0.0.1,"
                " or ask whoever runs the server to set ServerApp.allow_remote_access"
            )
            return {"error": "Forbidden", "message": message}
        if status_code == 404 and not self.check_origin():  # type: ignore[attr-defined]
            origin = self.request.headers.get("Origin", "")[:200]
            message = (
                f"cross-origin request from {origin!r} refused: this server does not allow"
                " that origin (ServerApp.allow_origin); call the API from a page the server"
                " itself serves, or authenticate with 'Authorization: token <token>'"
            )
            return {"error": "NotFound", "message": message}
        if status_code == 403 and self.request.headers.get(KERNEL_TOKEN_HEADER):
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
        return {"error": "NotFound", "message": f"nothing at {self.request.path[:200]!r}"}

    def describe_http_error(self, status_code: int, exc: web.HTTPError) -> dict[str, str] | None:
        """jupyter_server's refusals, explained: a bare 403/404 raised before any crucible code
        ran (see :meth:`_refusal_before_handler`), an XSRF failure, the authorizer's no."""
        if not exc.log_message and status_code in (403, 404):
            return self._refusal_before_handler(status_code)
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
                " read to list, view and stream, write to submit and cancel);"
                " ask whoever runs this Jupyter server for the permission."
            )
        return {"error": reason.replace(" ", ""), "message": message}


class CrucibleAPIHandler(CrucibleMixin, APIHandler):  # type: ignore[misc, override]
    """Base of the REST handlers on the Jupyter server: JSON in, JSON out."""
