"""Every refusal of the crucible API is JSON with a precise status code, never a 500."""

from __future__ import annotations

import pytest

from crucible_jupyter.server.base import KERNEL_TOKEN_HEADER
from tests.helpers.jupyter import wait_terminal


@pytest.fixture
def crucible_config():
    """Small limits, so the size refusals are cheap to reach."""
    return {
        "CrucibleDispatcher": {"max_code_bytes": 1000},
        "CrucibleApp": {"max_body_bytes": 8000, "max_page_size": 7},
    }


ID = "01234567-89ab-7def-8123-456789abcdef"


@pytest.mark.parametrize(
    ("method", "path", "raw", "params", "status"),
    [
        ("POST", ("executions",), b"{not json", None, 400),
        ("POST", ("executions",), b"", None, 400),
        ("POST", ("executions",), b"[1, 2]", None, 400),
        ("POST", ("executions",), b"\xff\xfe", None, 400),
        ("POST", ("executions",), b"[" * 3000 + b"]" * 3000, None, 400),
        ("POST", ("executions",), b'{"code": 5}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "bogus": 1}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "timeout": NaN}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "timeout": "soon"}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "memory": "lots"}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "tags": [1]}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "env": {"LD_PRELOAD": "x"}}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "backend": "nope"}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "notebook": "x"}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "language": "r"}', None, 422),
        ("POST", ("executions",), b'{"code": "' + b"x" * 2000 + b'"}', None, 413),
        ("POST", ("executions",), b'{"code": "' + b"x" * 9000 + b'"}', None, 413),
        ("GET", ("executions",), None, {"limit": "0"}, 400),
        ("GET", ("executions",), None, {"limit": "ten"}, 400),
        ("GET", ("executions",), None, {"limit": "100000"}, 400),
        ("GET", ("executions",), None, {"limit": "1_0"}, 400),  # int() would take these
        ("GET", ("executions",), None, {"limit": " 10 "}, 400),
        ("GET", ("executions",), None, {"limit": "\u0661\u0660"}, 400),  # Arabic-Indic 10
        ("GET", ("executions", ID), None, {"after": "\uff11"}, 400),  # a full-width 1
        ("GET", ("executions",), None, {"status": "bogus"}, 400),
        ("GET", ("executions",), None, {"tag": "a b"}, 400),
        ("GET", ("executions",), None, {"since": "yesterday"}, 400),
        ("GET", ("executions",), None, {"until": "99999999999999999999"}, 400),
        ("GET", ("executions",), None, {"cursor": "garbage!"}, 400),
        ("GET", ("executions",), None, {"cursor": "Zm9v"}, 400),
        ("GET", ("executions",), None, {"since": "2030-01-01", "until": "2020-01-01"}, 400),
        ("GET", ("executions", ID), None, None, 404),
        ("GET", ("executions", "not-an-id"), None, None, 404),
        ("GET", ("executions", "x" * 5000), None, None, 404),
        ("GET", ("executions", ID), None, {"after": "-5"}, 400),
        ("POST", ("executions", ID, "cancel"), b"", None, 404),
        ("DELETE", ("executions", "not-an-id"), None, None, 404),
        ("GET", ("queue",), None, {"execution_id": "bad"}, 404),
        ("GET", ("stats",), None, {"since": "nope"}, 400),
        ("PUT", ("executions",), b"{}", None, 405),
        ("PATCH", ("executions", ID), b"{}", None, 405),
        ("POST", ("executions",), b'{"code": "1", "image": "python:3.12"}', None, 400),
        ("GET", ("nothing",), None, None, 404),
        ("POST", ("executions", ID, "bogus"), b"{}", None, 404),
        ("GET", (), None, None, 404),
        # numbers too large for a float were a 500 (OverflowError)
        ("POST", ("executions",), b'{"code": "1", "cpu": 1' + b"0" * 400 + b"}", None, 400),
        ("POST", ("executions",), b'{"code": "1", "timeout": 1' + b"0" * 400 + b"}", None, 400),
        ("POST", ("executions",), b'{"code": "1", "memory": 1' + b"0" * 400 + b"}", None, 400),
        ("POST", ("executions",), b'{"code": "1", "memory": "1' + b"0" * 400 + b'Gi"}', None, 400),
        # these were accepted (201): a key twice, a wrong-typed resources, cpu given twice
        ("POST", ("executions",), b'{"code": "1", "code": "2"}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "resources": []}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "cpu": 2, "resources": {"cpu": 1}}', None, 400),
        # a name with a newline or an escape sequence rewrote `crucible history` listings
        ("POST", ("executions",), b'{"code": "1", "name": "\\u001b[2Jgone"}', None, 400),
        ("POST", ("executions",), b'{"code": "1", "name": "two\\nlines"}', None, 400),
    ],
)
def test_error_codes(api, method, path, raw, params, status, crucible_app):
    code, body, response = api(method, *path, raw=raw, params=params)
    assert code == status, body
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "error" in body


def test_wrong_method_names_the_right_ones(api):
    code, body, response = api("PUT", "executions", raw=b"{}")
    assert code == 405
    assert response.headers["Allow"] == "GET, POST"
    assert body["message"].startswith("PUT is not allowed on /")
    assert body["message"].endswith("/crucible/api/executions; use GET or POST")


def test_unknown_path_points_at_the_document(api):
    code, body, _ = api("GET", "executoins")
    assert code == 404
    assert body["error"] == "NotFound"
    assert "/crucible/api/executoins" in body["message"]
    assert body["message"].endswith("/crucible/api/openapi.json")


def test_image_on_the_local_backend_says_what_to_do(api):
    code, body, _ = api("POST", "executions", body={"code": "1", "image": "ml"})
    assert code == 400
    assert body["field"] == "image"
    assert "local backend" in body["message"]
    assert "leave the image out" in body["message"]
    page = api("GET", "executions")[1]["executions"]
    assert not [e for e in page if e["image"] == "ml"]  # refused before it was stored


def test_size_limits_say_what_to_do(api):
    code, body, _ = api("POST", "executions", body={"code": "x" * 2000})
    assert code == 413
    assert body["field"] == "code"
    assert "limit" in body["message"]
    code, body, _ = api("POST", "executions", body={"code": "x" * 9000})
    assert code == 413
    assert body["field"] == "body"


def test_cancel_finished_is_409(api):
    code, execution, _ = api("POST", "executions", body={"code": "print(1)"})
    assert code == 201
    wait_terminal(api, execution["id"])
    code, body, _ = api("POST", "executions", execution["id"], "cancel", body={})
    assert code == 409
    assert body["error"] == "Conflict"
    assert body["message"]


def test_dispatcher_down_is_503(api, crucible_app, run):
    assert api("GET", "health")[0] == 200  # started on first use
    run(crucible_app.dispatcher.stop())
    code, body, _ = api("GET", "health")
    assert code == 503
    assert body["error"] == "Unavailable"
    code, body, _ = api("POST", "executions", body={"code": "print(1)"})
    assert code == 503


class TestStorageNotReadyAtStart:
    """The database is not there when the server starts: 503 with the reason, and the next
    request after it appears works (no restart needed)."""

    @pytest.fixture
    def crucible_config(self, tmp_path):
        return {"CrucibleDispatcher": {"db_url": "postgresql+psycopg://nobody@127.0.0.1:1/none"}}

    def test_503_then_recovers(self, api, crucible_app, tmp_path):
        code, body, _ = api("GET", "health")
        assert code == 503
        assert body["error"] == "Unavailable"
        assert "could not start" in body["message"]
        crucible_app.dispatcher.db_url = f"sqlite:///{tmp_path}/late.db"
        code, body, _ = api("GET", "health")
        assert code == 200, body


def test_refusals_quote_a_little_of_the_value_not_all_of_it(api):
    for body in (
        {"code": "1", "language": "x" * 5000},
        {"code": "1", "priority": "x" * 5000},
        {"code": "1", "tags": ["x" * 5000]},
        {"code": "1", "x" * 5000: 1},
    ):
        code, refusal, response = api("POST", "executions", body=body)
        assert code in (400, 422), refusal
        assert len(response.body) < 600, refusal["message"]
        assert "xxxx..." in refusal["message"]


def test_absurdly_long_number_is_refused_in_our_words(api):
    code, body, _ = api(
        "POST", "executions", raw=b'{"code": "1", "timeout": 1' + b"0" * 5000 + b"}"
    )
    assert code == 400
    assert body["field"] == "body"
    assert "5001 digits" in body["message"]
    assert "sys." not in body["message"]


def test_key_given_twice_is_named(api):
    code, body, _ = api(
        "POST", "executions", raw=b'{"code": "1", "notebook": {"path": "a", "path": "b"}}'
    )
    assert code == 400
    assert body["field"] == "path"
    assert "'path' more than once" in body["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"code": "1", "name": "\\ud800"}', "name"),
        (b'{"code": "1", "notebook": {"path": "a\\udfffb.ipynb"}}', "notebook.path"),
        (b'{"code": "1", "env": {"A": "\\ud800"}}', "env"),
    ],
)
def test_lone_surrogate_is_refused_not_stored_rewritten(api, body, field):
    """A JSON ``\\ud800`` escape is no Unicode text: it used to be stored as the six characters
    ``\\ud800`` (or, in env, make the cell fail in its runner)."""
    before = len(api("GET", "executions")[1]["executions"])
    code, refusal, _ = api("POST", "executions", raw=body)
    assert code == 400, refusal
    assert refusal["field"] == field, refusal
    assert "UTF-8" in refusal["message"]
    assert len(api("GET", "executions")[1]["executions"]) == before


def test_openapi_document_states_this_servers_limits(api):
    code, doc, _ = api("GET", "openapi.json")
    assert code == 200
    request = doc["components"]["schemas"]["ExecutionRequest"]["properties"]
    assert "at most 1000 UTF-8 bytes" in request["code"]["description"]
    (limit,) = [p for p in doc["paths"]["/executions"]["get"]["parameters"] if p["name"] == "limit"]
    assert limit["schema"]["maximum"] == 7


def test_non_local_host_header_says_so(api):
    code, body, _ = api("GET", "health", headers={"Host": "rebind.example"})
    assert code == 403, body
    assert "'rebind.example'" in body["message"]
    assert "allow_remote_access" in body["message"]


def _login_cookie(api, jp_serverapp) -> str:
    """A browser login: the token in the URL once, then cookies (like opening /lab?token=)."""
    token = jp_serverapp.identity_provider.token
    _, _, response = api("GET", "health", params={"token": token}, headers={"Authorization": ""})
    return "; ".join(c.split(";")[0] for c in response.headers.get_list("Set-Cookie"))


def test_browser_session_refusals_say_what_to_send(api, jp_serverapp):
    browser = {"Authorization": "", "Cookie": _login_cookie(api, jp_serverapp)}
    assert api("GET", "health", headers=browser)[0] == 200
    code, body, _ = api("POST", "executions", body={"code": "1"}, headers=browser)
    assert code == 403, body
    assert "X-XSRFToken" in body["message"], body
    # a page of another site, with the victim's cookies (and, say, a leaked XSRF token)
    evil = {
        **browser,
        "Cookie": browser["Cookie"] + "; _xsrf=abc",
        "X-XSRFToken": "abc",
        "Origin": "http://evil.example",
    }
    code, body, _ = api("DELETE", "executions", ID, headers=evil)
    assert code == 404, body
    assert "cross-origin" in body["message"], body
    assert "allow_origin" in body["message"]


def test_browser_login_is_recorded_as_the_servers_user(api, jp_serverapp, crucible_app):
    # jupyter_server gives each login a random anonymous identity; the history would
    # otherwise hold a new "user" for every browser session
    cookie = _login_cookie(api, jp_serverapp) + "; _xsrf=same"  # the double-submit pair
    browser = {"Authorization": "", "Cookie": cookie, "X-XSRFToken": "same"}
    code, execution, _ = api("POST", "executions", body={"code": "1"}, headers=browser)
    assert code == 201, execution
    assert execution["user"] == crucible_app.kernel_user
    wait_terminal(api, execution["id"])


@pytest.mark.parametrize(
    ("path", "params", "takes"),
    [
        (("executions",), {"state": "running"}, "it takes user, status, tag,"),
        (("queue",), {"execution": ID}, "it takes execution_id"),
        (("stats",), {"until": "0"}, "it takes user, since"),
        (("executions", ID), {"afer": "3"}, "it takes after"),
    ],
)
def test_unknown_query_parameter_is_refused_not_ignored(api, path, params, takes):
    """A misspelt filter used to be ignored: the answer looked right but was unfiltered."""
    code, body, _ = api("GET", *path, params=params)
    assert code == 400, body
    assert body["field"] == next(iter(params)), body
    assert takes in body["message"]


def test_jupyter_query_parameters_still_pass(api, jp_serverapp):
    """The token in the URL, and JupyterLab's cache-buster (``?<timestamp>``)."""
    token = jp_serverapp.identity_provider.token
    params = {"token": token, "1732890000123": "", "status": "succeeded"}
    code, body, _ = api("GET", "executions", params=params, headers={"Authorization": ""})
    assert code == 200, body


def test_stale_kernel_credential_says_to_restart_the_kernel(api):
    """A kernel holding the credential of an earlier server start was told to send a token."""
    stale = {KERNEL_TOKEN_HEADER: "from-an-earlier-start", "Authorization": ""}
    code, body, _ = api("GET", "health", headers=stale)
    assert code == 403, body
    assert KERNEL_TOKEN_HEADER in body["message"], body
    assert "restart the kernel" in body["message"]
