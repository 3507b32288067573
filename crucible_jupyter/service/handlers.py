"""The service's tornado handlers: the crucible API (the same resource classes as the server
extension, :func:`crucible_jupyter.server.handlers.routes`) on a JupyterHub-token host, and
the unauthenticated probes.

Every API request is authenticated in ``prepare`` (before any handler code, and before a
WebSocket upgrade) by :class:`~crucible_jupyter.service.auth.HubIdentity`; holders of the
access scope may read and write; the owner rule of :mod:`crucible_jupyter.server.common`
then limits them to their own executions (admin scope: all).

Browsers log in through the hub at ``{prefix}login`` (OAuth, answered at
``{prefix}oauth_callback``; see :mod:`.auth` for what that login may do); a browser that asks
an API URL for a page without credentials is sent there first.

Probes, for a kubelet or a load balancer (no token needed, nothing private in them):

* ``{prefix}healthz`` (liveness): 200 while the process serves requests;
* ``{prefix}readyz`` (readiness): 200 once the dispatcher has started and its database
  answers; 503 with the reason before that, when the database does not answer, and from
  the moment a shutdown begins (a reason that names no database, host or error text: the
  service's log has those).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from jupyterhub.services.auth import HubOAuthCallbackHandler
from tornado import web
from tornado.httputil import url_concat
from tornado.websocket import WebSocketHandler

from ..errors import CrucibleError, NotFound
from ..server.common import Caller, CrucibleRequestMixin
from ..server.handlers import routes
from .auth import Unauthorized

if TYPE_CHECKING:
    from .app import CrucibleService

#: How a shared message names the server extension's API ("GET crucible/api/executions").
_EXTENSION_API = re.compile(r"(?<![/\w])crucible/api/")


class ServiceMixin(CrucibleRequestMixin):
    """The service host of the API's handlers: callers are JupyterHub users."""

    auth_scheme = "hub"
    _caller: Caller | None = None

    @property
    def crucible(self) -> CrucibleService:
        """The running :class:`~crucible_jupyter.service.app.CrucibleService`."""
        return self.settings["crucible_service"]

    @property
    def log(self) -> Any:  # type: ignore[override]
        """The service's logger."""
        return self.crucible.log

    async def prepare(self) -> None:
        """Authenticate with JupyterHub before anything else (401/403/503 as JSON; a browser
        asking for a page without credentials is sent to log in through the hub)."""
        try:
            self._caller = await self.crucible.identity.caller(self)
        except Unauthorized:
            if not self._browser_wants_login():
                raise
            login = self.crucible.identity.login_path
            self.redirect(url_concat(login, {"next": self.request.uri}))

    def _browser_wants_login(self) -> bool:
        request = self.request
        return (
            self.crucible.identity.browser_login
            and request.method == "GET"
            and request.headers.get("Upgrade", "").lower() != "websocket"
            and "text/html" in request.headers.get("Accept", "")
        )

    @property
    def caller(self) -> Caller:
        """The hub-verified caller."""
        if self._caller is None:  # pragma: no cover - prepare() always ran or refused
            raise web.HTTPError(401)
        return self._caller

    def authenticate(self) -> None:
        """Done in :meth:`prepare`."""

    async def authorize(self, action: str) -> None:
        """The access scope (checked in :meth:`prepare`) allows every action; the owner rule
        decides which executions."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The shared JSON error, naming this service's API path where a message points at
        the extension's (``crucible/api/...``, as the storage's texts do)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, CrucibleError) and _EXTENSION_API.search(exc.message):
            exc.message = _EXTENSION_API.sub(self.crucible.api_root + "/", exc.message)
        super().write_error(status_code, **kwargs)

    def set_default_headers(self) -> None:
        """API answers are not to be cached or sniffed."""
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")


class ServiceAPIHandler(ServiceMixin, web.RequestHandler):
    """Base of the service's REST handlers."""


class ServiceSocket(ServiceMixin, WebSocketHandler):
    """Base of the service's WebSockets (the socket logic is mixed in by ``routes``)."""

    def set_default_headers(self) -> None:
        """No extra headers on a WebSocket handshake."""

    def check_origin(self, origin: str) -> bool:
        """Any origin with a token; a browser login's cookie counts only from the service's
        own origin (checked with the credentials, in :meth:`prepare`)."""
        return True


class LivenessHandler(web.RequestHandler):
    """``healthz``: 200 while the process answers."""

    def get(self) -> None:
        """Always ``{"status": "ok"}``."""
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "ok"}))


class ReadinessHandler(web.RequestHandler):
    """``readyz``: 200 when the service can take work, else 503 with the reason."""

    async def get(self) -> None:
        """``{"ready": bool, "reason": str|null}``."""
        service: CrucibleService = self.settings["crucible_service"]
        reason = await service.not_ready_reason()
        self.set_status(503 if reason else 200)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"ready": reason is None, "reason": reason}))


class LoginHandler(web.RequestHandler):
    """``login?next=PATH``: send a browser to log in through the hub (OAuth), then back to
    ``PATH`` (a path of this service only; anything else goes to the execution list)."""

    def get(self) -> None:
        """Redirect to the hub's OAuth authorization, with the state in a cookie."""
        service: CrucibleService = self.settings["crucible_service"]
        identity = service.identity
        if not identity.browser_login:
            self.set_status(404)
            self.set_header("Content-Type", "application/json")
            self.finish(
                json.dumps(
                    {
                        "error": "NotFound",
                        "message": "browser login is off: JupyterHub gave this service no"
                        " OAuth client (run it as a hub service with a `url`, which sets"
                        " JUPYTERHUB_CLIENT_ID); send 'Authorization: token <token>' instead",
                    }
                )
            )
            return
        default = service.api_root + "/executions"
        next_url = self.get_argument("next", default)
        if not _is_own_path(next_url, service.prefix):
            next_url = default  # never redirect a login elsewhere
        hub_auth = identity.hub_auth
        params = {}
        verifier = None
        if hub_auth.pkce_enabled:
            verifier, challenge, method = hub_auth.generate_pkce_code_challenge()
            params = {"code_challenge": challenge, "code_challenge_method": method}
        state = hub_auth.set_state_cookie(self, next_url=next_url, code_verifier=verifier)
        self.redirect(url_concat(hub_auth.login_url, {**params, "state": state}))


def _is_own_path(url: str, prefix: str) -> bool:
    """Whether ``url`` is a path under ``prefix`` on this host (no scheme, host or tricks:
    no ``.`` or ``..`` segment, even percent-encoded, which the browser would resolve to a
    path outside ``prefix``, such as the hub's pages or another user's server)."""
    parts = urlsplit(url)
    return (
        not parts.scheme
        and not parts.netloc
        and url.startswith(prefix)
        and "\\" not in url
        and all(ord(c) > 31 for c in url)
        and not {".", ".."} & set(unquote(parts.path).split("/"))
    )


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """``oauth_callback``: the hub's OAuth answer; sets the login cookie, back to ``next``."""

    def initialize(self) -> None:
        """Use the service's own HubOAuth (its settings, its state store)."""
        self.hub_auth = self.settings["crucible_service"].identity.hub_auth


class OutsideHandler(ServiceAPIHandler):
    """Any other path: a JSON 404 pointing at the API's document (after authentication)."""

    async def get(self, path: str = "") -> None:
        """404 naming the path."""
        raise NotFound(
            f"there is no crucible API endpoint at {self.request.path[:200]!r}; the"
            f" endpoints are listed in {self.crucible.api_root}/openapi.json",
            field="path",
        )

    post = put = patch = delete = get


def service_routes(prefix: str) -> list[tuple[str, type]]:
    """Every route of the service under ``prefix`` (``/services/crucible/``)."""
    root = re.escape(prefix.rstrip("/"))
    return [
        (rf"{root}/healthz/?", LivenessHandler),
        (rf"{root}/readyz/?", ReadinessHandler),
        (rf"{root}/login", LoginHandler),
        (rf"{root}/oauth_callback", OAuthCallbackHandler),
        *routes(rf"{root}/api", ServiceAPIHandler, ServiceSocket),
        (rf"{root}(?P<path>/.*)?", OutsideHandler),
    ]
