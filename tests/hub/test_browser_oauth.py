"""A browser that talks to the crucible service directly logs in through the hub (OAuth,
jupyterhub's HubOAuth): an HTTP client with a cookie jar logs in to the real hub's login
form, then follows the redirects a browser would follow. The login opens API pages and does
nothing else: no writes, no WebSockets, no scripts' requests (so neither another site's page
nor one of another user's server, same origin here, can use it)."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests.helpers.hub import HTML, Hub, hub_login, ws_refusal

pytestmark = pytest.mark.hub


def json_of(r: requests.Response) -> Any:
    assert r.headers["Content-Type"].startswith("application/json"), (r.url, r.text[:500])
    return r.json()


def test_a_browser_logs_in_through_the_hub_and_reads_its_own(hub: Hub) -> None:
    alices = hub.call("alice", "POST", "executions", json={"code": "print('a')"})[1]
    bobs = hub.call("bob", "POST", "executions", json={"code": "print('b')"})[1]
    browser = hub_login(hub, "alice")
    url = f"{hub.service_url}api/executions?limit=500"

    # a page asked for without credentials: to the hub's OAuth, back, and the answer
    r = browser.get(url, headers=HTML, timeout=60)
    hops = [h.headers["Location"] for h in r.history]
    assert r.status_code == 200, (hops, r.text[:500])
    assert r.url == url, hops
    assert any("/hub/api/oauth2/authorize" in h for h in hops), hops
    assert any("/services/crucible/oauth_callback" in h for h in hops), hops
    # an opaque origin, never framed: a same-origin page that opens it cannot read it
    assert "sandbox" in r.headers["Content-Security-Policy"].split(";")[0], r.headers
    assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], r.headers
    listed = {e["id"]: e["user"] for e in json_of(r)["executions"]}
    assert listed[alices["id"]] == "alice"
    assert bobs["id"] not in listed
    r = browser.get(f"{hub.service_url}api/executions/{bobs['id']}", timeout=60)
    assert r.status_code == 404, r.text

    # the login reads only: a write with the cookie alone is refused, nothing is stored
    r = browser.post(f"{hub.service_url}api/executions", json={"code": "print(1)"}, timeout=60)
    assert r.status_code == 403, r.text
    assert "may only read" in json_of(r)["message"]
    r = browser.post(f"{hub.service_url}api/executions/{alices['id']}/cancel", timeout=60)
    assert r.status_code == 403, r.text

    # nor scripts' requests (pages of other user servers share the hub's origin), nor
    # WebSockets, from whatever origin
    r = browser.get(url, headers={"Sec-Fetch-Mode": "cors"}, timeout=60)
    assert r.status_code == 403, r.text
    assert "a script (cors request)" in json_of(r)["message"]
    r = browser.get(url, headers={"Sec-Fetch-Mode": "navigate"}, timeout=60)
    assert r.status_code == 200, r.text
    cookie = "; ".join(
        f"{c.name}={c.value}" for c in browser.cookies if c.path.startswith("/services/crucible")
    )
    stream = f"{hub.service_url}api/executions/{alices['id']}/stream"
    for origin in (hub.url, "http://evil.example"):
        code, body = ws_refusal(stream, {"Cookie": cookie, "Origin": origin})
        assert code == 403, body
        assert "does not open WebSockets" in body["message"], body


def test_a_browser_login_of_an_admin_sees_everyone(hub: Hub) -> None:
    bobs = hub.call("bob", "POST", "executions", json={"code": "print('b')"})[1]
    browser = hub_login(hub, "admin")
    r = browser.get(f"{hub.service_url}api/executions/{bobs['id']}", headers=HTML, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert any("/oauth_callback" in h.headers["Location"] for h in r.history), r.history
    assert json_of(r)["user"] == "bob"


def test_without_a_login_a_script_gets_401_and_logins_stay_on_the_service(hub: Hub) -> None:
    r = requests.get(f"{hub.service_url}api/executions", timeout=60)
    assert r.status_code == 401, r.text
    assert "in a browser, log in at /services/crucible/login" in r.json()["message"]

    # a login never sends the browser anywhere but this service
    browser = hub_login(hub, "alice")
    for evil in ("https://evil.example/x", "//evil.example/x", "/hub/admin", "/\\evil.example"):
        r = browser.get(f"{hub.service_url}login", params={"next": evil}, headers=HTML, timeout=60)
        assert r.status_code == 200, (evil, r.text[:300])
        assert r.url == f"{hub.service_url}api/executions", (evil, r.url)
