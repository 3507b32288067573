"""Authentication and authorization of every crucible handler; the kernel credential."""

from __future__ import annotations

import os

import pytest
from tornado.httpclient import HTTPClientError

from tests.helpers.jupyter import NoCrucibleAuthorizer, ReadOnlyAuthorizer, kernel_headers

ID = "01234567-89ab-7def-8123-456789abcdef"


def test_unauthenticated_is_refused(api, jp_ws_fetch, run):
    for method, path in [("GET", ("executions",)), ("POST", ("executions",)), ("GET", ("health",))]:
        code, body, _ = api(method, *path, headers={"Authorization": ""}, body={"code": "1"})
        assert code == 403, (method, path, body)
        if method == "GET":  # (a POST without a token fails jupyter_server's XSRF check first)
            assert body["message"].startswith("not authenticated: send the Jupyter server's")
    with pytest.raises(HTTPClientError) as e:
        run(
            jp_ws_fetch(
                "crucible", "api", "executions", ID, "stream", headers={"Authorization": ""}
            )
        )
    assert e.value.code == 403
    with pytest.raises(HTTPClientError) as e:
        run(jp_ws_fetch("crucible", "api", "changes", headers={"Authorization": ""}))
    assert e.value.code == 403


def test_kernel_credential_is_the_servers_user(api, crucible_app):
    headers = kernel_headers(crucible_app)
    code, execution, _ = api("POST", "executions", body={"code": "print(1)"}, headers=headers)
    assert code == 201
    assert execution["user"] == crucible_app.kernel_user
    code, _, _ = api("GET", "executions", headers={**headers, "X-Crucible-Token": "wrong"})
    assert code == 403


def test_kernels_get_url_and_credential(jp_serverapp, crucible_app, jp_base_url):
    assert os.environ["CRUCIBLE_TOKEN"] == crucible_app.kernel_token
    url = os.environ["CRUCIBLE_SERVER_URL"]
    assert url.endswith(jp_base_url)
    assert f":{jp_serverapp.port}" in url


class TestReadOnlyUser:
    """A user allowed to read crucible but not to write: lists yes, submit/cancel no (403)."""

    @pytest.fixture
    def crucible_config(self):
        return {"ServerApp": {"authorizer_class": ReadOnlyAuthorizer}}

    def test_read_but_not_write(self, api, jp_ws_fetch, run):
        assert api("GET", "executions")[0] == 200
        assert api("GET", "health")[0] == 200
        assert api("GET", "queue")[0] == 200
        assert api("GET", "stats")[0] == 200
        assert api("GET", "openapi.json")[0] == 200
        run(jp_ws_fetch("crucible", "api", "changes")).close()  # watching is reading
        code, body, _ = api("POST", "executions", body={"code": "print(1)"})
        assert code == 403
        assert "not authorized to write" in body["message"]
        assert "ask whoever runs this Jupyter server for the permission" in body["message"]
        assert api("POST", "executions", ID, "cancel", body={})[0] == 403
        assert api("DELETE", "executions", ID)[0] == 403


class TestNoCrucibleUser:
    """A user with no permission on resource crucible gets 403 everywhere, WebSocket too."""

    @pytest.fixture
    def crucible_config(self):
        return {"ServerApp": {"authorizer_class": NoCrucibleAuthorizer}}

    def test_everything_forbidden(self, api, jp_ws_fetch, run, crucible_app):
        for method, path in [
            ("GET", ("executions",)),
            ("POST", ("executions",)),
            ("GET", ("executions", ID)),
            ("GET", ("queue",)),
            ("GET", ("stats",)),
            ("GET", ("health",)),
            ("GET", ("openapi.json",)),
        ]:
            code, body, _ = api(method, *path, body={"code": "1"} if method == "POST" else None)
            assert code == 403, (method, path, body)
            assert body["error"] == "Forbidden"
        # the kernel credential authenticates but does not bypass authorization
        code, _, _ = api("GET", "executions", headers=kernel_headers(crucible_app))
        assert code == 403
        for socket in (("executions", ID, "stream"), ("changes",)):
            with pytest.raises(HTTPClientError) as e:
                run(jp_ws_fetch("crucible", "api", *socket))
            assert e.value.code == 403, socket
