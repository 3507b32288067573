"""An attacker's review of the crucible service on a real JupyterHub (issue 10): mallory
tries every way the review could think of to reach victim's executions, to be someone she
is not, or to make the service fail; victim and mallory are users this module makes on the
session's hub (tests/hub/conftest.py), so their cells hold up nobody else's.

The rules under attack: the owner is whom the hub names for the token (never a field,
query, header or path the client sends); another user's execution answers like an unknown
id (404) on every route, REST and WebSocket; a token without the access scope, or a
revoked or expired one, opens nothing; only the unfiltered admin scope makes an admin; a
browser login opens no writes and no WebSockets; bad input is a 4xx saying what was
wrong, never a 5xx.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import requests

from crucible_jupyter.storage import encode_cursor
from tests.helpers.hub import (
    CRUCIBLE,
    GUARD_SECONDS,
    HTML,
    Hub,
    Kernel,
    Service,
    UserServer,
    hub_login,
    stop_process,
    text_of,
    user_server,
    ws_refusal,
)
from tests.helpers.net import free_port

pytestmark = pytest.mark.hub

FOREVER = "print('victim runs', flush=True)\nimport time\nwhile True:\n    time.sleep(0.05)\n"
SECRET = "secret of victim"
#: The hub's id of each token :func:`new_token` made (to revoke it).
TOKEN_IDS: dict[str, str] = {}


def control(hub: Hub) -> dict[str, str]:
    """Headers of the hub's test-control service (admin:users, tokens)."""
    return {"Authorization": f"token {hub.control_token}"}


def make_user(hub: Hub, name: str) -> None:
    """Create the hub user ``name`` (kept if it exists)."""
    r = requests.post(
        f"{hub.api_url}/users", json={"usernames": [name]}, headers=control(hub), timeout=30
    )
    assert r.status_code in (201, 409), r.text


def new_token(hub: Hub, user: str, scopes: list[str] | None = None, **extra: Any) -> str:
    """A new API token of ``user`` (with ``scopes``, else the user's own), made by the hub;
    also kept in ``hub.tokens`` under its own value, so ``hub.call(token, ...)`` uses it."""
    body: dict[str, Any] = {"note": "crucible attacks", **extra}
    if scopes is not None:
        body["scopes"] = scopes
    r = requests.post(
        f"{hub.api_url}/users/{quote(user, safe='')}/tokens",
        json=body,
        headers=control(hub),
        timeout=30,
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    hub.tokens[token] = token
    TOKEN_IDS[token] = r.json()["id"]
    return token


def wait_status(hub: Hub, who: str, execution_id: str, wanted: set[str]) -> dict[str, Any]:
    """Poll until the execution has one of ``wanted`` statuses (bounded, not a timing check)."""
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        code, body = hub.call(who, "GET", f"executions/{execution_id}")
        assert code == 200, body
        if body["status"] in wanted:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def submit(hub: Hub, who: str, code: str) -> str:
    status, body = hub.call(who, "POST", "executions", json={"code": code})
    assert status == 201, body
    return body["id"]


def ids_listed(hub: Hub, who: str, query: str = "limit=500") -> dict[str, str]:
    """``{id: owner}`` of what ``who`` lists."""
    code, page = hub.call(who, "GET", f"executions?{query}")
    assert code == 200, page
    return {e["id"]: e["user"] for e in page["executions"]}


def raw_request(hub: Hub, who: str | None, method: str, path: str, **headers: str) -> Any:
    """``(status, JSON body or text)`` of a request whose path is sent byte for byte (no
    client-side removal of ``..`` segments), through the hub's proxy."""
    url = urlsplit(hub.service_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    try:
        conn.request(method, f"{url.path}api/{path}", headers={**hub.headers(who), **headers})
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(body)
    except ValueError:
        return r.status, body.decode("utf-8", "replace")


@dataclass
class People:
    """victim's executions (two finished, one running for the whole module) and mallory's."""

    finished: list[str]
    running: str
    mallorys: str


@pytest.fixture(scope="module")
def people(hub: Hub) -> Iterator[People]:
    """victim and mallory, their tokens in ``hub.tokens``, and their executions."""
    for name in ("victim", "mallory"):
        make_user(hub, name)
        hub.tokens[name] = new_token(hub, name)
    finished = [submit(hub, "victim", f"print({SECRET!r}, {n})") for n in range(2)]
    for execution_id in finished:  # one at a time for each user: these before the long one
        assert wait_status(hub, "victim", execution_id, {"succeeded", "failed"})["status"] == (
            "succeeded"
        )
    running = submit(hub, "victim", FOREVER)
    wait_status(hub, "victim", running, {"running"})
    mallorys = submit(hub, "mallory", "print('mallory was here')")
    wait_status(hub, "mallory", mallorys, {"succeeded"})
    yield People(finished, running, mallorys)
    hub.call("victim", "POST", f"executions/{running}/cancel")


def same_refusal(got: tuple[int, Any], unknown: tuple[int, Any]) -> None:
    """``got`` (for another user's id) is a refusal, the very one ``unknown`` (for an id
    that does not exist, spelled the same way) is, but for the hex digits of the ids."""
    code, body = got
    assert 400 <= code < 500, got
    assert isinstance(body, dict), got

    def masked(answer: tuple[int, Any]) -> tuple[int, str]:
        return answer[0], re.sub(r"[0-9a-fA-F]", "h", json.dumps(answer[1], sort_keys=True))

    assert masked(got) == masked(unknown), (got, unknown)


# -- another user's id on every route -------------------------------------------------------------


def route_answer(
    hub: Hub, method: str, template: str, where: str, websocket: bool, execution_id: str
) -> tuple[int, Any]:
    """mallory's answer for an OpenAPI operation with ``execution_id`` filled in."""
    path = template.replace("{execution_id}", execution_id).lstrip("/")
    if where == "query":
        path += f"?execution_id={execution_id}"
    if websocket:
        return ws_refusal(f"{hub.service_url}api/{path}", hub.headers("mallory"))
    return hub.call("mallory", method.upper(), path)


def test_every_route_answers_another_users_id_like_an_unknown_one(hub: Hub, people: People) -> None:
    """Every operation of the OpenAPI document that takes an execution id (in the path or
    the query; REST and WebSocket): mallory's answer for victim's running execution is the
    answer for an id that does not exist, and victim's cell runs on."""
    code, doc = hub.call("mallory", "GET", "openapi.json")
    assert code == 200, doc
    theirs, unknown = people.running, str(uuid.uuid4())
    checked = []
    for template, operations in doc["paths"].items():
        for method, op in operations.items():
            if method == "parameters":
                continue
            params = {
                p["name"]: p["in"]
                for p in [*operations.get("parameters", []), *op.get("parameters", [])]
            }
            if "execution_id" not in params:
                continue
            where = params["execution_id"]
            websocket = "101" in op["responses"]  # refused before the upgrade
            got = route_answer(hub, method, template, where, websocket, theirs)
            assert got[0] == 404, (method, template, got)
            same_refusal(got, route_answer(hub, method, template, where, websocket, unknown))
            checked.append(f"{method.upper()} {template}")
    assert len(checked) >= 5, checked  # get, delete, cancel, stream, queue position
    assert wait_status(hub, "victim", theirs, {"running"})["user"] == "victim"


#: Odd spellings of an execution id, as a path segment (percent-encoded where needed).
ODD_FORMS: dict[str, Callable[[str], str]] = {
    "upper case": lambda i: quote(i.upper()),
    "leading space": lambda i: quote(" " + i),
    "trailing space": lambda i: quote(i + " "),
    "trailing newline": lambda i: quote(i + "\n"),
    "tab inside": lambda i: quote(i[:8] + "\t" + i[8:]),
    "prefix": lambda i: i[:8],
    "one short": lambda i: i[:-1],
    "one more": lambda i: i + "0",
    "no dashes": lambda i: i.replace("-", ""),
    "braces": lambda i: quote("{" + i + "}", safe=""),
    "urn": lambda i: quote("urn:uuid:" + i, safe=""),
    "NUL after": lambda i: quote(i + "\x00", safe=""),
    "encoded traversal": lambda i: quote("../" + i, safe=""),
    "encoded slash": lambda i: quote(i + "/", safe=""),
    "every character percent-encoded": lambda i: "".join(f"%{ord(c):02X}" for c in i),
    "double-encoded": lambda i: "".join(f"%25{ord(c):02X}" for c in i),
}


@pytest.mark.parametrize("form", list(ODD_FORMS))
def test_odd_forms_of_another_users_id_reach_nothing(hub: Hub, people: People, form: str) -> None:
    """An id spelled otherwise (case, spaces, a newline the id pattern's ``$`` would let
    through, prefixes, encodings, traversal) on every route with an id: mallory gets the
    refusal an unknown id spelled that way gets, and never victim's execution."""
    spell = ODD_FORMS[form]
    theirs, unknown = people.finished[0], str(uuid.uuid4())
    routes: list[tuple[str, str]] = [
        ("GET", "executions/{}"),
        ("DELETE", "executions/{}"),
        ("POST", "executions/{}/cancel"),
        ("GET", "queue?execution_id={}"),
        ("WS", "executions/{}/stream"),
    ]
    for method, route in routes:

        def answer(execution_id: str, method: str = method, route: str = route) -> Any:
            path = route.format(spell(execution_id))
            if method == "WS":
                return ws_refusal(f"{hub.service_url}api/{path}", hub.headers("mallory"))
            return raw_request(hub, "mallory", method, path)

        got = answer(theirs)
        assert got[0] in (400, 404), (form, method, route, got)
        assert SECRET not in json.dumps(got[1]), got
        # what an id is spelled as in a message depends on the spelling, never on the owner
        same_refusal(got, answer(unknown))
    # the percent-encoded id is victim's very id: she reads it that way, mallory never does
    if form == "every character percent-encoded":
        code, body = raw_request(hub, "victim", "GET", f"executions/{spell(theirs)}")
        assert code == 200, body
        assert body["id"] == theirs


def test_dot_segments_never_lead_to_another_users_execution(hub: Hub, people: People) -> None:
    """Paths sent byte for byte with ``.``/``..`` segments (resolved by no client) through
    the hub's proxy: a 4xx, never victim's record."""
    theirs, mine = people.finished[0], people.mallorys
    for path in (
        f"executions/{mine}/../{theirs}",
        f"executions/{mine}/./../{theirs}",
        f"executions/./{theirs}",
        f"executions/{mine}/%2e%2e/{theirs}",
        f"queue/../executions/{theirs}",
        f"executions/{theirs}/../../executions/{theirs}",
    ):
        code, body = raw_request(hub, "mallory", "GET", path)
        assert code in (400, 404), (path, code, body)
        assert SECRET not in json.dumps(body), (path, body)
        assert not (isinstance(body, dict) and body.get("user") == "victim"), (path, body)


# -- who the caller is -----------------------------------------------------------------------------

SPOOFED = {
    "X-Forwarded-User": "victim",
    "X-Remote-User": "victim",
    "Remote-User": "victim",
    "X-Auth-Request-User": "victim",
    "X-JupyterHub-User": "victim",
    "X-User": "victim",
    "X-Forwarded-For": "127.0.0.1",
    "X-Real-Ip": "127.0.0.1",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "Cookie": "jupyterhub-session-id=0; user=victim",
}


def test_headers_fields_and_queries_naming_another_user_are_not_taken(
    hub: Hub, people: People
) -> None:
    """Identity claims a proxy might add (X-Forwarded-User and kin), body fields and
    query parameters naming victim: mallory stays mallory; without a token, 401."""
    theirs = people.finished[0]
    # with mallory's token, headers naming victim change nothing
    r = requests.get(
        f"{hub.service_url}api/executions",
        params={"limit": 500},
        headers={**hub.headers("mallory"), **SPOOFED},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert {e["user"] for e in r.json()["executions"]} == {"mallory"}, r.text
    r = requests.get(
        f"{hub.service_url}api/executions/{theirs}",
        headers={**hub.headers("mallory"), **SPOOFED},
        timeout=60,
    )
    assert r.status_code == 404, r.text
    # without a token they are no credential at all
    r = requests.get(f"{hub.service_url}api/executions", headers=SPOOFED, timeout=60)
    assert r.status_code == 401, r.text
    code, body = ws_refusal(f"{hub.service_url}api/executions/{theirs}/stream", SPOOFED)
    assert code == 401, body

    # a submission is mallory's whatever it says; owner fields are refused, not ignored
    r = requests.post(
        f"{hub.service_url}api/executions",
        params={"user": "victim", "owner": "victim"},
        headers={**hub.headers("mallory"), **SPOOFED},
        json={"code": "print(1)"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert r.json()["user"] == "mallory", r.text
    before = ids_listed(hub, "admin", "user=victim&limit=500")
    for field in ("user", "owner", "USER", "username", "hub_user"):
        code, body = hub.call("mallory", "POST", "executions", json={"code": "1", field: "victim"})
        assert code == 400, (field, body)
        assert body["field"] == field, body
    assert ids_listed(hub, "admin", "user=victim&limit=500") == before


@pytest.mark.parametrize(
    "query",
    [
        "user=victim",
        "user=VICTIM",
        "user=victim%20",
        "user=%20victim",
        "user=vic%2A",
        "user=%25",
        "user=victim&status=running",
        "user=victim&cursor={cursor}",
        "cursor={cursor}",
        "cursor={forged}",
    ],
)
def test_list_filters_and_cursors_never_widen_what_a_user_sees(
    hub: Hub, people: People, query: str
) -> None:
    """``?user=`` names nobody but the caller; a cursor is a position, not a permission:
    victim's own next_cursor, or one forged from her newest execution, still lists only
    mallory's."""
    code, page = hub.call("victim", "GET", "executions?limit=1")
    assert code == 200, page
    assert page["next_cursor"], page
    forged = encode_cursor(2**53, people.running)
    query = query.format(cursor=page["next_cursor"], forged=forged)
    listed = ids_listed(hub, "mallory", f"{query}&limit=500")
    assert set(listed.values()) <= {"mallory"}, (query, listed)
    for execution_id in (*people.finished, people.running):
        assert execution_id not in listed
    if "user=" in query:
        code, stats = hub.call("mallory", "GET", f"stats?{query.split('&')[0]}")
        assert code == 200, stats
        assert stats["total"] == 0, (query, stats)
    # the admin's same filter does find victim's (the filter itself works)
    if query == "user=victim":
        assert people.running in ids_listed(hub, "admin", "user=victim&limit=500")


def test_repeated_or_broken_filters_are_400(hub: Hub, people: People) -> None:
    """A filter given twice, undecodable, with a NUL, misspelled or out of range: 400 with
    a message, never an unfiltered or another user's list."""
    for query in (
        "user=mallory&user=victim",
        "user=%FF",
        "user=victim%00",
        "User=victim",
        "owner=victim",
        "limit=1e3",
        "limit=-1",
        "limit=501",
        "cursor=" + "A" * 600,
        "cursor=%00",
        "since=tomorrow",
        "status=RUNNING",
    ):
        code, body = hub.call("mallory", "GET", f"executions?{query}")
        assert code == 400, (query, body)
        assert body["message"], body


def test_narrow_tokens_open_nothing_and_only_the_unfiltered_admin_scope_is_admin(
    hub: Hub, people: People
) -> None:
    """Tokens the hub made with fewer scopes than their user holds: the admin user's token
    without the admin scope, or with it filtered to a user or group, is no admin; the admin
    scope alone, or a token without the access scope, opens nothing (REST and WebSocket)."""
    theirs = people.finished[0]
    access = "access:services!service=crucible"
    # the admin user's token without the admin scope, or with a filtered one: no admin
    for scopes in (
        [access],
        [access, "custom:crucible:admin!user=victim"],
        [access, "custom:crucible:admin!user=admin"],
        [access, "custom:crucible:admin!group=victims"],
    ):
        token = new_token(hub, "admin", scopes)
        code, body = hub.call(token, "GET", f"executions/{theirs}")
        assert code == 404, (scopes, body)
        assert theirs not in ids_listed(hub, token), scopes
        code, body = hub.call(token, "POST", f"executions/{people.running}/cancel")
        assert code == 404, (scopes, body)
    # the admin scope without the access scope: no access at all
    token = new_token(hub, "admin", ["custom:crucible:admin"])
    code, body = hub.call(token, "GET", f"executions/{theirs}")
    assert code == 403, body
    assert access in body["message"], body
    # a token of victim's own without the access scope opens none of her things
    token = new_token(hub, "victim", ["read:users:name!user=victim", "read:servers!user=victim"])
    for method, path in (
        ("GET", f"executions/{theirs}"),
        ("GET", "executions"),
        ("POST", "executions"),
        ("DELETE", f"executions/{people.running}"),
        ("GET", "stats"),
        ("GET", "queue"),
        ("GET", "openapi.json"),
    ):
        code, body = hub.call(token, method, path, json={"code": "1"} if method == "POST" else None)
        assert code == 403, (method, path, body)
    for path in (f"executions/{theirs}/stream", "changes"):
        code, body = ws_refusal(f"{hub.service_url}api/{path}", hub.headers(token))
        assert code == 403, (path, body)
    # the full admin token does see it (so the refusals above are about the scopes)
    token = new_token(hub, "admin", [access, "custom:crucible:admin"])
    code, body = hub.call(token, "GET", f"executions/{theirs}")
    assert code == 200, body
    assert body["user"] == "victim", body


def test_revoked_and_expired_tokens_are_401(hub: Hub, people: People) -> None:
    """A token revoked at the hub, and one past its expiry (neither shown to the service
    before, so no cached answer): 401 on REST and WebSocket."""
    theirs = people.finished[0]
    revoked = new_token(hub, "victim")
    r = requests.delete(
        f"{hub.api_url}/users/victim/tokens/{TOKEN_IDS[revoked]}",
        headers=control(hub),
        timeout=30,
    )
    assert r.status_code == 204, r.text
    expired = new_token(hub, "victim", expires_in=1)
    deadline = time.monotonic() + GUARD_SECONDS
    while True:  # until the hub itself no longer takes it (never shown to the service before)
        r = requests.get(f"{hub.api_url}/user", headers=hub.headers(expired), timeout=30)
        if r.status_code in (401, 403):
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    for token in (revoked, expired):
        code, body = hub.call(token, "GET", f"executions/{theirs}")
        assert code == 401, body
        assert "does not know this token" in body["message"], body
        code, body = ws_refusal(
            f"{hub.service_url}api/executions/{theirs}/stream", hub.headers(token)
        )
        assert code == 401, body


# -- a user server's own token ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def victim_server(hub: Hub, people: People) -> Iterator[UserServer]:
    """victim's user server (remote mode: it forwards to the service with its own token)."""
    with user_server(hub, "victim") as server:
        yield server


async def test_a_notebook_that_takes_its_servers_token_is_still_only_its_user(
    hub: Hub, people: People, victim_server: UserServer
) -> None:
    """Code in victim's notebook (a python3 kernel of her server in remote mode) reads her
    server's JupyterHub token: it is victim at the service and nobody else, and her server
    holds no database or cluster credentials."""
    server = victim_server
    async with Kernel(server, "python3") as kernel:
        reply, outputs = await kernel.run(
            "import json, os\n"
            "print(json.dumps({'token': os.environ.get('JUPYTERHUB_API_TOKEN'),"
            " 'env': sorted(os.environ)}))"
        )
    assert reply["status"] == "ok", reply
    leaked = json.loads(text_of(outputs))
    token, names = leaked["token"], leaked["env"]
    assert token, leaked
    for name in names:
        assert not name.startswith(("KUBE", "CRUCIBLE_DB", "PG")), names
        assert "DB_URL" not in name, names
    hub.tokens["victim-server"] = token

    # at the service: victim's own and nothing else, whatever it asks for
    assert set(ids_listed(hub, "victim-server").values()) == {"victim"}
    code, body = hub.call("victim-server", "GET", f"executions/{people.mallorys}")
    assert code == 404, body
    code, body = hub.call("victim-server", "GET", "executions?user=mallory")
    assert code == 200, body
    assert body["executions"] == [], body
    code, body = hub.call(
        "victim-server", "POST", "executions", json={"code": "1", "user": "mallory"}
    )
    assert code == 400, body
    # at the hub: no more than the server's scopes (no other user, no admin)
    r = requests.get(f"{hub.api_url}/user", headers=hub.headers("victim-server"), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "victim", r.text
    r = requests.get(
        f"{hub.api_url}/users/mallory", headers=hub.headers("victim-server"), timeout=30
    )
    assert r.status_code in (403, 404), r.text

    # mallory's token at victim's server: refused by the server; victim's own token
    # through her server reaches only her executions
    r = requests.get(
        f"{server.api}executions",
        headers=hub.headers("mallory"),
        timeout=60,
        allow_redirects=False,
    )
    assert r.status_code in (302, 403), r.text
    code, body, _ = server.call("GET", f"executions/{people.mallorys}")
    assert code == 404, body
    code, body, _ = server.call("GET", "executions?user=mallory")
    assert code == 200, body
    assert body["executions"] == [], body


def test_a_login_to_victims_server_opens_no_cross_origin_socket_or_write(
    hub: Hub, people: People, victim_server: UserServer
) -> None:
    """victim's browser is logged in to her server (the hub's OAuth, as JupyterLab is); a
    page of another site makes the browser send that cookie to her server's crucible API,
    which forwards with her server's token: refused before anything is forwarded."""
    server = victim_server
    browser = hub_login(hub, "victim")
    r = browser.get(f"{server.base}lab", headers=HTML, timeout=60)
    assert r.status_code == 200, r.text[:300]
    cookie = "; ".join(
        f"{c.name}={c.value}" for c in browser.cookies if c.path.startswith("/user/victim")
    )
    assert "jupyterhub-user-victim=" in cookie, [c.name for c in browser.cookies]
    evil = {"Cookie": cookie, "Origin": "http://evil.example"}
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for path in ("changes", f"executions/{people.running}/stream"):
        r = requests.get(f"{server.api}{path}", headers={**evil, **handshake}, timeout=60)
        assert r.status_code == 403, (path, r.status_code, r.text)  # jupyter_server's text
    before = ids_listed(hub, "victim")
    for origin in ("http://evil.example", hub.url):
        for method, path in (
            ("POST", "executions"),
            ("POST", f"executions/{people.running}/cancel"),
            ("DELETE", f"executions/{people.running}"),
        ):
            r = requests.request(
                method,
                f"{server.api}{path}",
                json={"code": "print('forged')"},
                headers={"Cookie": cookie, "Origin": origin},
                timeout=60,
            )
            assert r.status_code in (403, 404), (origin, method, path, r.text)
    r = requests.get(
        f"{server.api}executions/{people.finished[0]}",
        headers={**evil, "Sec-Fetch-Mode": "cors"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
    assert SECRET not in r.text
    assert ids_listed(hub, "victim") == before
    assert wait_status(hub, "victim", people.running, {"running"})


# -- browsers ----------------------------------------------------------------------------------------


def service_cookie(browser: requests.Session) -> tuple[str, str]:
    """``(name, value)`` of the crucible service's login cookie in ``browser`` (which
    scripts cannot read, and which no other path of the hub's origin is sent)."""
    for c in browser.cookies:
        if c.path.startswith("/services/crucible") and not c.name.endswith("oauth-state"):
            if c.name == "_xsrf":
                continue
            assert c.has_nonstandard_attr("HttpOnly"), c
            assert c.path == "/services/crucible/", c
            return c.name, c.value or ""
    raise AssertionError(f"no service cookie in {[c.name for c in browser.cookies]}")


def test_only_the_services_own_signed_cookie_is_a_login(hub: Hub, people: People) -> None:
    """The hub's own login cookie, the service's cookie value under another service's
    name, a tampered or an unsigned one (a bare token): no login (401); with a token
    besides the cookie, the token decides who the caller is."""
    theirs = people.finished[0]
    url = f"{hub.service_url}api/executions/{theirs}"
    # a browser logged in to the hub only: the hub's cookie is nothing to the service
    browser = hub_login(hub, "victim")
    hub_cookies = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    r = requests.get(url, headers={"Cookie": hub_cookies}, timeout=60)
    assert r.status_code == 401, r.text
    r = requests.get(
        url, headers={"Cookie": hub_cookies, **HTML}, allow_redirects=False, timeout=60
    )
    assert r.status_code == 302, r.text
    assert r.headers["Location"].startswith("/services/crucible/login?"), r.headers

    # victim logs in to the service; her cookie reads her execution (the control)
    r = browser.get(url, headers=HTML, timeout=60)
    assert r.status_code == 200, r.text[:300]
    name, value = service_cookie(browser)
    r = requests.get(url, headers={"Cookie": f"{name}={value}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["user"] == "victim"

    # that value under another name, tampered with, or victim's bare token: no login
    token = hub.tokens["victim"]
    tampered = value[:-2] + ("AA" if not value.endswith("AA") else "BB")
    for cookie in (
        f"jupyterhub-user-victim={value}",
        f"jupyterhub-hub-login={value}",
        f"{name}={tampered}",
        f"{name}={token}",
        f"{name}=" + value.replace(value.split("|")[0], "1", 1),
    ):
        r = requests.get(url, headers={"Cookie": cookie}, timeout=60)
        assert r.status_code == 401, (cookie, r.text)
    # mallory's token with victim's cookie: the token decides who it is
    r = requests.get(
        url, headers={"Cookie": f"{name}={value}", **hub.headers("mallory")}, timeout=60
    )
    assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    "next_url",
    [
        "/services/crucible/../../hub/admin",
        "/services/crucible/%2e%2e/%2E%2E/hub/admin",
        "/services/crucible/api/../../../user/mallory/lab",
        "/services/crucible/./../../hub/token",
        "/services/crucible/../..//evil.example/x",
    ],
)
def test_a_login_never_ends_outside_the_service(hub: Hub, next_url: str) -> None:
    """The login's ``next`` is a path of this service only: dot segments (which the
    browser resolves) do not lead to the hub's pages or another user's server."""
    browser = hub_login(hub, "victim")
    r = browser.get(f"{hub.service_url}login", params={"next": next_url}, headers=HTML, timeout=60)
    assert r.status_code == 200, (r.url, r.text[:300])
    assert r.url == f"{hub.service_url}api/executions", (next_url, r.url)


@pytest.mark.parametrize("origin", [None, "http://evil.example", "null", "same"])
def test_a_login_cookie_opens_no_websocket_from_any_origin(
    hub: Hub, people: People, origin: str | None
) -> None:
    """Cross-site WebSocket hijacking: a page that opens a WebSocket to the service makes
    the browser send its login cookie; the service refuses it, whatever the Origin."""
    browser = hub_login(hub, "victim")
    r = browser.get(f"{hub.service_url}api/executions", headers=HTML, timeout=60)
    assert r.status_code == 200, r.text[:300]
    name, value = service_cookie(browser)
    headers = {"Cookie": f"{name}={value}"}
    if origin is not None:
        headers["Origin"] = hub.url if origin == "same" else origin
    for path in ("changes", f"executions/{people.running}/stream"):
        for extra in ({}, {"Sec-Fetch-Mode": "websocket"}):
            code, body = ws_refusal(f"{hub.service_url}api/{path}", {**headers, **extra})
            assert code == 403, (path, body)
            assert "does not open WebSockets" in body["message"], body
    # nor a write or a script's read, with that Origin
    r = requests.post(
        f"{hub.service_url}api/executions/{people.running}/cancel", headers=headers, timeout=60
    )
    assert r.status_code == 403, r.text
    for mode in ("cors", "no-cors", "same-origin"):  # fetch(), <script src>, same-site XHR
        r = requests.get(
            f"{hub.service_url}api/executions",
            headers={**headers, "Sec-Fetch-Mode": mode},
            timeout=60,
        )
        assert r.status_code == 403, (mode, r.text)
    assert wait_status(hub, "victim", people.running, {"running"})


def test_no_cross_origin_reads_are_allowed(hub: Hub, people: People) -> None:
    """No CORS: no ``Access-Control-*`` header on an answer to another origin, and a
    preflight is refused, so a page of another site cannot read an answer."""
    evil = {"Origin": "http://evil.example"}
    r = requests.get(
        f"{hub.service_url}api/executions", headers={**hub.headers("mallory"), **evil}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert not any(h.lower().startswith("access-control-") for h in r.headers), r.headers
    r = requests.options(
        f"{hub.service_url}api/executions",
        headers={
            **evil,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=60,
    )
    assert 400 <= r.status_code < 500, r.text
    assert not any(h.lower().startswith("access-control-") for h in r.headers), r.headers


# -- bad input -----------------------------------------------------------------------------------


BAD_BODIES = [
    b"",
    b"   ",
    b"[]",
    b'"code"',
    b"null",
    b"1e999",
    b"{",
    b'{"code": "1"',
    b"\xff\xfe{}",
    b'{"code": NaN}',
    b'{"code": "1", "timeout": Infinity}',
    b'{"code": "1", "timeout": 1e400}',
    b'{"code": "1", "timeout": 1' + b"0" * 2000 + b"}",
    b'{"code": "1", "priority": 1e308}',
    b'{"code": "print(1)\\ud800"}',
    b'{"code": "print(1)\\u0000"}',
    b'{"code": "1", "tags": ["a\\ud800"]}',
    b'{"code": "1", "env": {"A": "\\ud800"}}',
    b'{"code": "1", "env": {"\\u0000": "x"}}',
    b'{"code": "1", "notebook": {"path": "\\ud800"}}',
    b'{"code": "1", "resources": {"cpu": NaN}}',
    b'{"code": "1", "\\ud800": 1}',
    b'{"code": "1", "code": "2"}',
    b"[" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]


def test_malformed_bodies_are_4xx_with_a_reason_and_store_nothing(hub: Hub, people: People) -> None:
    """Bodies that are not JSON objects, NaN and infinities, huge integers, lone
    surrogates, NUL bytes, duplicate keys, 100 000 levels of nesting, 9 MiB: each a 4xx
    with a message; nothing stored."""
    before = ids_listed(hub, "mallory")
    for body in BAD_BODIES:
        r = requests.post(
            f"{hub.service_url}api/executions",
            data=body,
            headers={**hub.headers("mallory"), "Content-Type": "application/json"},
            timeout=60,
        )
        assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text[:300])
        assert r.json()["message"], r.text
    for big in (b'{"code": "' + b"x" * (9 << 20) + b'"}', b'{"code": "1"}' + b" " * (9 << 20)):
        r = requests.post(
            f"{hub.service_url}api/executions",
            data=big,
            headers={**hub.headers("mallory"), "Content-Type": "application/json"},
            timeout=120,
        )
        assert r.status_code == 413, r.text[:300]
        assert "over the limit" in r.json()["message"], r.text
    assert ids_listed(hub, "mallory") == before
    # a cancel takes no body: one is not read, let alone trusted
    code, body = hub.call(
        "mallory", "POST", f"executions/{people.mallorys}/cancel", data=b"[" * 1000
    )
    assert code == 409, body


def test_a_cell_at_the_service_holds_none_of_the_services_credentials(
    hub: Hub, people: People
) -> None:
    """mallory's cell runs in the service's sandbox: it finds no hub token (the service's
    own is in the service's environment), no database URL, not the service's database
    file, and no other process to read them from."""
    database = hub.db_url.removeprefix("sqlite:///")
    code = (
        "import glob, json, os\n"
        "print(json.dumps({'env': dict(os.environ),"
        f" 'db': os.path.exists({database!r}),"
        " 'procs': len(glob.glob('/proc/[0-9]*'))}))\n"
    )
    execution_id = submit(hub, "mallory", code)
    body = wait_status(hub, "mallory", execution_id, {"succeeded", "failed"})
    assert body["status"] == "succeeded", body
    out = "".join(e["text"] for e in body["events"] if e["type"] == "stream")
    seen = json.loads(out)
    for name, value in seen["env"].items():
        assert not any(w in name for w in ("TOKEN", "JUPYTERHUB", "DB_URL", "KUBE")), seen
        assert "sqlite" not in value, seen
        assert "postgresql" not in value, seen
    assert seen["db"] is False, seen
    assert seen["procs"] <= 3, seen  # its own (bubblewrap's init, python, perhaps a shell)


# -- names the hub gives ---------------------------------------------------------------------------


def test_a_user_named_like_a_service_does_not_see_the_services_executions(
    hub: Hub, tmp_path: Path
) -> None:
    """A hub service and a user called ``service:<its name>`` are two callers: the user
    (whom the hub lets anyone be called so) sees none of the service's executions. The
    service here is the hub's test-control; this crucible lets its token in
    (``HubAuth.access_scopes`` adds a scope it holds), as a role granting it
    ``access:services!service=crucible`` would."""
    service = Service(
        tmp_path,
        hub.hub_api_direct,
        "--HubAuth.access_scopes=access:services!service=crucible",
        "--HubAuth.access_scopes=list:users",
    )
    try:
        hub.tokens["test-control"] = hub.control_token
        status, body = service.call(hub, "test-control", "POST", "executions", json={"code": "1"})
        assert status == 201, body
        theirs, owner = body["id"], body["user"]
        assert owner.endswith("test-control"), body
        for lookalike in ("service:test-control", owner):
            r = requests.post(
                f"{hub.api_url}/users",
                json={"usernames": [lookalike]},
                headers=control(hub),
                timeout=30,
            )
            if r.status_code == 400:  # the hub lets nobody be called that
                continue
            assert r.status_code in (201, 409), r.text
            hub.tokens[lookalike] = new_token(hub, lookalike)
            status, page = service.call(hub, lookalike, "GET", "executions")
            assert status == 200, page
            assert page["executions"] == [], (lookalike, owner, page)
            status, body = service.call(hub, lookalike, "GET", f"executions/{theirs}")
            assert status == 404, (lookalike, body)
    finally:
        stop_process(service.proc, signal.SIGKILL)


def test_two_users_whose_names_storage_would_merge_never_share_executions(hub: Hub) -> None:
    """JupyterHub (on SQLite) lets a user's name hold a NUL; storage writes NUL as the four
    characters ``\\x00``, which is another user's name. The first is refused with a reason;
    the second sees nothing of the first's."""
    nul, lookalike = "nul\x00user", "nul\\x00user"
    for name in (nul, lookalike):
        make_user(hub, name)
        hub.tokens[name] = new_token(hub, name)
    code, body = hub.call(nul, "POST", "executions", json={"code": "print('nul secret')"})
    if code == 201:  # recorded: it must still be the NUL user's alone
        wait_status(hub, "admin", body["id"], {"succeeded", "failed"})
        code2, page = hub.call(lookalike, "GET", "executions")
        assert page["executions"] == [], page
        code2, got = hub.call(lookalike, "GET", f"executions/{body['id']}")
        assert code2 == 404, got
    else:
        assert code == 403, body
        assert "cannot be recorded" in body["message"], body
        assert "administrator" in body["message"], body


# -- what anyone may ask ---------------------------------------------------------------------------


def test_the_public_readiness_probe_names_no_database(hub: Hub, tmp_path: Path) -> None:
    """``readyz`` needs no token and the hub's proxy serves it to anyone: while the database
    cannot be reached, it says so without naming the database, its host or its user (the
    service's log has those, for the operator)."""
    port = free_port()
    secret_bits = ("crucible_db_user", "pw-not-shown", "127.0.0.1:1", "crucible_private")
    env = {
        **os.environ,
        "JUPYTERHUB_API_URL": hub.hub_api_direct,
        "JUPYTERHUB_SERVICE_NAME": "crucible",
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "CRUCIBLE_DB_URL": "postgresql+psycopg://crucible_db_user:pw-not-shown@127.0.0.1:1/crucible_private",
    }
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CRUCIBLE), "serve", "--CrucibleDispatcher.enabled_backends=local"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + GUARD_SECONDS
        while "could not start" not in log.read_text(errors="replace"):  # it tried, and failed
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        r = requests.get(f"http://127.0.0.1:{port}/services/crucible/readyz", timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["ready"] is False, r.text
        assert "the service's log says why" in r.json()["reason"], r.text
        for bit in secret_bits:
            assert bit not in r.text, (bit, r.text)
        assert "crucible_db_user" in log.read_text(), "the operator's log lost the detail"
    finally:
        stop_process(proc, signal.SIGKILL)
