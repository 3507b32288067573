"""Who is calling the service: JupyterHub's answer for the request's token.

The promises:

* the caller's name is the one JupyterHub gives for the token (``GET /hub/api/user`` through
  ``jupyterhub.services.auth.HubAuth``, answers cached ``cache_max_age`` seconds), never a
  value the client sends; a service's token is ``service/NAME``, which no user can be
  called; a name storage would rewrite (NUL, lone surrogates) is refused (403);
* no token: 401; a token the hub does not know (expired, revoked, from another hub): 401;
  a token without the service's access scope (``access:services!service=<name>``): 403;
  each with a message saying what to send or whom to ask, naming the service's path;
  JupyterHub's unfiltered ``access:services`` (every service of the hub, as its admin role
  has) lets the caller in as themselves, with no crucible admin rights;
* a hub that does not answer (down, restarting, failing, or silent for ``hub_timeout``
  seconds) is a 503 with the reason, never a 500 or a hang;
* the token's own scopes decide admin rights (``admin_scope``, unfiltered), not the user's
  ``admin`` flag, which would ignore how the token was scoped;
* browsers (when the hub gave the service an OAuth client, as it does for a hub-managed
  service with a ``url``): a login through the hub (``{prefix}login``, then the hub's OAuth
  back to ``{prefix}oauth_callback``, jupyterhub's ``HubOAuth``) leaves a signed cookie
  holding a hub token scoped for this service; that cookie only opens API pages in the
  browser (GET navigations: no writes, no WebSockets, no scripts' requests), so neither
  another site's page nor a page of another user's server (same origin without per-user
  subdomains) can submit, cancel or read through it; those need a token in
  ``Authorization``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from jupyterhub.services.auth import HubAuth, HubOAuth, check_scopes
from tornado import web

from ..errors import CrucibleError, Forbidden, Unavailable
from ..server.common import Caller
from ..storage.values import clean_text


class Unauthorized(CrucibleError):
    """The request carries no credential the hub recognises (401)."""

    status_code = 401
    headers = {"WWW-Authenticate": 'token realm="JupyterHub"'}


class HubIdentity:
    """Turns a request into a :class:`~crucible_jupyter.server.common.Caller` via JupyterHub."""

    def __init__(
        self,
        hub_auth: HubAuth | HubOAuth,
        *,
        admin_scope: str,
        service_name: str,
        prefix: str = "",
        hub_timeout: float = 10.0,
    ) -> None:
        self.hub_auth = hub_auth
        self.hub_timeout = hub_timeout
        self.admin_scope = admin_scope
        self.service_name = service_name
        self.prefix = prefix or f"/services/{service_name}/"
        if not hub_auth.access_scopes:
            hub_auth.access_scopes = {f"access:services!service={service_name}"}

    @property
    def access_scopes(self) -> set[str]:
        """The scopes of which a token needs one to use the service."""
        return set(self.hub_auth.access_scopes)

    def _token_page(self) -> str:
        return self.hub_auth.hub_prefix.rstrip("/") + "/token"

    @property
    def browser_login(self) -> bool:
        """Whether browsers can log in through the hub: the hub gave this service an OAuth
        client (``$JUPYTERHUB_CLIENT_ID``, set for a hub-managed service with a ``url``)."""
        return isinstance(self.hub_auth, HubOAuth) and bool(self.hub_auth.oauth_client_id)

    @property
    def login_path(self) -> str:
        """Where a browser starts its login: ``{prefix}login``."""
        return self.prefix + "login"

    def _browser_hint(self) -> str:
        return f"; in a browser, log in at {self.login_path}" if self.browser_login else ""

    def _check_cookie_use(self, handler: web.RequestHandler) -> None:
        """A browser login opens API pages (reads by navigation) and nothing else: no writes,
        no WebSockets, no scripts (``Sec-Fetch-Mode`` other than ``navigate``). Without
        per-user subdomains, pages of every user server share the hub's origin, so a script
        there must not be able to use another user's login."""
        request = handler.request
        token_hint = (
            "send 'Authorization: token <token>' with an API token of your JupyterHub user"
            f" (made at {self._token_page()})"
        )
        if request.headers.get("Upgrade", "").lower() == "websocket":
            raise Forbidden(
                f"a browser login to the crucible service at {self.prefix} does not open"
                f" WebSockets; {token_hint}"
            )
        if request.method not in ("GET", "HEAD"):
            raise Forbidden(
                f"a browser login to the crucible service at {self.prefix} may only read; to"
                f" {request.method} {token_hint}"
            )
        mode = request.headers.get("Sec-Fetch-Mode")
        if mode is not None and mode != "navigate":
            raise Forbidden(
                f"a browser login to the crucible service at {self.prefix} opens its pages in"
                f" the browser only; a script ({mode} request) must {token_hint}"
            )

    async def caller(self, handler: web.RequestHandler) -> Caller:
        """The verified caller of ``handler``'s request; Unauthorized, Forbidden or
        Unavailable (hub down) otherwise."""
        token = self.hub_auth.get_token(handler, in_cookie=False)
        by_cookie = False
        if not token and self.browser_login:
            token = self.hub_auth.get_token(handler, in_cookie=True)
            by_cookie = bool(token)
        if not token:
            raise Unauthorized(
                f"no JupyterHub token: the crucible service at {self.prefix} needs"
                " 'Authorization: token <token>' with an API token of your JupyterHub user"
                f" ($JUPYTERHUB_API_TOKEN in a user server, or one made at {self._token_page()})"
                + self._browser_hint()
            )
        if by_cookie:
            # what a browser login opens gets an opaque origin and is never framed: a page
            # of another user's server (the same origin, without subdomains) that opens it
            # in a frame or a window cannot read it
            handler.set_header("Content-Security-Policy", "sandbox; frame-ancestors 'none'")
            handler.set_header("X-Frame-Options", "DENY")
            self._check_cookie_use(handler)
        model = await self._user_for(token)
        if not model:
            if by_cookie:
                self.hub_auth.clear_cookie(handler)
                raise Unauthorized(
                    f"your browser login to the crucible service at {self.prefix} has ended"
                    f" (the hub no longer knows its token); log in again at {self.login_path}"
                )
            raise Unauthorized(
                "JupyterHub does not know this token (expired, revoked, or from another hub);"
                f" the crucible service at {self.prefix} needs a current API token of your"
                f" JupyterHub user (made at {self._token_page()})"
            )
        scopes = set(model.get("scopes") or ())
        kind = model.get("kind", "user")
        name = str(model.get("name") or "")
        if not check_scopes(self.access_scopes, scopes):
            needed = " or ".join(sorted(self.access_scopes))
            raise Forbidden(
                f"the token of JupyterHub {kind} {name!r} does not grant access to the"
                f" {self.service_name!r} service at {self.prefix}: it needs the scope {needed};"
                " ask your"
                " JupyterHub administrator to grant it (a role with that scope for your user"
                " and, for tokens of user servers, c.Spawner.server_token_scopes)"
            )
        admin = bool(self.admin_scope) and bool(check_scopes({self.admin_scope}, scopes))
        return Caller(self._owner(kind, name), admin=admin)

    def _owner(self, kind: str, name: str) -> str:
        """The owner name recorded for the hub's ``kind`` ``name``: a user's name as it is;
        ``service/NAME`` for a service (users and services have separate name spaces in
        the hub, and JupyterHub refuses '/' in both names, so no user can be called that;
        ``service:NAME`` could be). Forbidden for a name storage would rewrite (NUL, lone
        surrogates: two users would share one owner) or an empty one."""
        owner = name if kind == "user" else f"{kind}/{name}"
        if not name or clean_text(owner) != owner:
            raise Forbidden(
                f"the JupyterHub {kind} name {name[:80]!r} cannot be recorded as the owner of"
                " executions as it is (it is empty, or holds a NUL byte or a lone surrogate);"
                " ask your JupyterHub administrator to give it a plain name"
            )
        return owner

    async def _user_for(self, token: str) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(
                self.hub_auth.user_for_token(token, sync=False), self.hub_timeout
            )
        except asyncio.TimeoutError:
            raise Unavailable(
                f"cannot check the token with JupyterHub at {self.hub_auth.api_url}: it did"
                f" not answer within {self.hub_timeout:g} s; the hub may be overloaded or"
                " restarting: retry shortly"
            ) from None
        except web.HTTPError as e:
            raise Unavailable(
                f"cannot check the token with JupyterHub at {self.hub_auth.api_url}:"
                f" {e.log_message or e.reason or e.status_code}; the hub may be down or"
                " restarting: retry shortly"
            ) from None
        except Exception as e:  # noqa: BLE001 -- an unexpected client failure is still the hub's outage
            raise Unavailable(
                f"cannot check the token with JupyterHub at {self.hub_auth.api_url}: {e};"
                " retry shortly"
            ) from None
