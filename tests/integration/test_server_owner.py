"""The server extension's owner rule where identities differ (issue 10, item 3): with an
identity provider that knows several users, each sees only their own executions; the
server's own user (``kernel_user``) sees all, as before."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from jupyter_server.auth.identity import IdentityProvider, User
from tornado.httpclient import HTTPClientError

from tests.helpers.jupyter import wait_terminal

OWNER = "owner"
HEADER = "X-Test-User"


class HeaderIdentity(IdentityProvider):
    """Names the caller from the ``X-Test-User`` header (a stand-in for a provider that knows
    several users, such as JupyterHub's with sharing); without it, the token's own user."""

    def get_user(self, handler: Any) -> Any:
        """``User(name)`` from the header; else jupyter_server's token check."""
        name = handler.request.headers.get(HEADER)
        if name:
            return User(username=name, name=name)
        return super().get_user(handler)

    def is_token_authenticated(self, handler: Any) -> bool:
        """Header users are API clients (no browser cookie, so no XSRF check)."""
        return bool(handler.request.headers.get(HEADER)) or super().is_token_authenticated(handler)


@pytest.fixture
def crucible_config() -> dict[str, Any]:
    return {
        "ServerApp": {"identity_provider_class": HeaderIdentity},
        "CrucibleApp": {"kernel_user": OWNER},
    }


def as_user(name: str) -> dict[str, str]:
    return {HEADER: name}


def test_each_identity_sees_its_own_and_the_owner_sees_all(api, jp_ws_fetch, run) -> None:
    code, mine, _ = api(
        "POST", "executions", body={"code": "print('m')"}, headers=as_user("mallory")
    )
    assert code == 201, mine
    assert mine["user"] == "mallory", mine
    wait_terminal(api, mine["id"])  # (as the server's token user: the owner)
    code, hers, _ = api("POST", "executions", body={"code": "print('e')"}, headers=as_user("eve"))
    assert code == 201, hers
    assert hers["user"] == "eve", hers

    unknown = str(uuid.uuid4())
    _, unknown_body, _ = api("GET", "executions", unknown, headers=as_user("eve"))
    code, body, _ = api("GET", "executions", mine["id"], headers=as_user("eve"))
    assert code == 404
    assert body["message"] == unknown_body["message"].replace(unknown, mine["id"])
    assert (
        api("POST", "executions", mine["id"], "cancel", body={}, headers=as_user("eve"))[0] == 404
    )
    assert api("GET", "queue", headers=as_user("eve"))[0] == 200
    with pytest.raises(HTTPClientError) as e:
        run(
            jp_ws_fetch(
                "crucible", "api", "executions", mine["id"], "stream", headers=as_user("eve")
            )
        )
    assert e.value.code == 404

    code, page, _ = api("GET", "executions", headers=as_user("eve"))
    assert {e["user"] for e in page["executions"]} == {"eve"}, page
    code, page, _ = api("GET", "executions", params={"user": "mallory"}, headers=as_user("eve"))
    assert page["executions"] == [], page
    code, stats, _ = api("GET", "stats", headers=as_user("eve"))
    assert stats["total"] == 1, stats

    # the server's own user (its token, its kernels) keeps seeing everything
    code, page, _ = api("GET", "executions")
    assert {mine["id"], hers["id"]} <= {e["id"] for e in page["executions"]}
    code, body, _ = api("GET", "executions", mine["id"])
    assert code == 200
    assert body["user"] == "mallory"
    code, stats, _ = api("GET", "stats")
    assert stats["total"] == 2, stats
