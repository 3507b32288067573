"""Who a request to the crucible API is, on a Jupyter server: the server's identity provider,
extended with the kernel credential."""

from __future__ import annotations

import hmac
from typing import Any

from jupyter_server.auth.identity import User
from tornado import web

from ..protocol import KERNEL_TOKEN_HEADER


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
            # JupyterHub's single-user server replaces the XSRF check with one that reads this
            handler._token_authenticated = True  # type: ignore[attr-defined]
            return self._user
        return self._inner.get_user(handler)

    def is_token_authenticated(self, handler: web.RequestHandler) -> bool:
        """True for the kernel token and for whatever the inner provider calls token auth."""
        return self._matches(handler) or self._inner.is_token_authenticated(handler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
