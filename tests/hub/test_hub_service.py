"""crucible as a JupyterHub service, through the hub's proxy: authentication by the hub,
authorization by owner, live streaming, admins (issue 10, items 1-3)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from crucible_jupyter.server.openapi import openapi_document
from tests.helpers.hub import Hub, close_ws, ws_refusal

pytestmark = pytest.mark.hub

FOREVER = "print('first', flush=True)\nimport time\nwhile True:\n    time.sleep(0.05)\n"
GUARD = 120  # seconds a polling loop may take before the test fails (not a timing check)


def ws_url(hub: Hub, path: str) -> str:
    return f"{hub.service_url.replace('http://', 'ws://', 1)}api/{path}"


async def ws(hub: Hub, who: str | None, path: str) -> WebSocketClientConnection:
    """A WebSocket to the service's API through the hub's proxy, as ``who``."""
    return await websocket_connect(HTTPRequest(ws_url(hub, path), headers=hub.headers(who)))


async def read_json(conn: WebSocketClientConnection) -> dict[str, Any] | None:
    message = await conn.read_message()
    return None if message is None else json.loads(message)


def submit(hub: Hub, who: str, code: str, **extra: Any) -> dict[str, Any]:
    code_, body = hub.call(who, "POST", "executions", json={"code": code, **extra})
    assert code_ == 201, body
    return body


def wait_status(hub: Hub, who: str, execution_id: str, wanted: set[str]) -> dict[str, Any]:
    """Poll until the execution has one of ``wanted`` statuses (bounded by GUARD)."""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        code, body = hub.call(who, "GET", f"executions/{execution_id}")
        assert code == 200, body
        if body["status"] in wanted:
            return body
        time.sleep(0.05)
    pytest.fail(f"{execution_id} never reached {wanted}: {body}")


def cancel(hub: Hub, who: str, execution_id: str) -> dict[str, Any]:
    code, body = hub.call(who, "POST", f"executions/{execution_id}/cancel")
    assert code == 200, body
    return body


def stdout_of(body: dict[str, Any]) -> str:
    return "".join(
        e["text"] for e in body["events"] if e["type"] == "stream" and e["name"] == "stdout"
    )


# -- authentication ------------------------------------------------------------------------------


async def test_no_token_is_401_and_a_token_without_the_scope_is_403(hub: Hub) -> None:
    code, body = hub.call(None, "GET", "executions")
    assert code == 401, body
    assert body["error"] == "Unauthorized"
    assert "Authorization: token <token>" in body["message"]

    hub.tokens["nonsense"] = "not-a-token-" + uuid.uuid4().hex
    code, body = hub.call("nonsense", "GET", "executions")
    assert code == 401, body
    assert "does not know this token" in body["message"]

    code, body = hub.call("alice-noscope", "GET", "executions")
    assert code == 403, body
    assert body["error"] == "Forbidden"
    assert "access:services!service=crucible" in body["message"]
    assert "ask your JupyterHub administrator" in body["message"]
    code, body = hub.call("alice-noscope", "POST", "executions", json={"code": "print(1)"})
    assert code == 403, body

    for who, status in ((None, 401), ("alice-noscope", 403)):
        code, body = ws_refusal(f"{hub.service_url}api/changes", hub.headers(who))
        assert code == status, body


def test_refusals_name_the_services_own_paths(hub: Hub) -> None:
    unknown = str(uuid.uuid4())
    code, body = hub.call("alice", "GET", f"executions/{unknown}")
    assert code == 404, body
    assert "GET /services/crucible/api/executions" in body["message"], body
    assert " crucible/api/" not in body["message"], body
    code, body = hub.call(None, "GET", "executions")
    assert code == 401, body
    assert "crucible service at /services/crucible/" in body["message"], body
    code, body = hub.call("alice-noscope", "GET", "executions")
    assert code == 403, body
    assert "'crucible' service at /services/crucible/" in body["message"], body


def test_the_unfiltered_access_scope_passes_one_for_another_service_does_not(hub: Hub) -> None:
    # access:services without a filter is JupyterHub's "every service" (its admin role has it):
    # it lets the caller in as themselves, and makes no crucible admin
    code, body = hub.call("hubwide", "POST", "executions", json={"code": "print(1)"})
    assert code == 201, body
    assert body["user"] == "hubwide"
    mine = body["id"]
    alices = submit(hub, "alice", "print('not for hubwide')")
    code, body = hub.call("hubwide", "GET", f"executions/{alices['id']}")
    assert code == 404, body
    code, page = hub.call("hubwide", "GET", "executions?limit=500")
    assert code == 200, page
    assert {e["id"] for e in page["executions"]} == {mine}, page
    # a token scoped to another service of the hub is refused
    code, body = hub.call("hubwide-other", "GET", "executions")
    assert code == 403, body
    assert "access:services!service=crucible" in body["message"], body


async def test_probes_need_no_token(hub: Hub) -> None:
    r = requests.get(f"{hub.service_url}readyz", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"ready": True, "reason": None}
    r = requests.get(f"{hub.service_url}healthz", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_the_service_serves_the_extensions_api(hub: Hub) -> None:
    code, doc = hub.call("alice", "GET", "openapi.json")
    assert code == 200, doc
    assert doc["servers"] == [{"url": "/services/crucible/api"}]
    assert set(doc["paths"]) == set(openapi_document("/x")["paths"])
    assert doc["security"] == [{"HubToken": []}]
    assert "401" in doc["paths"]["/executions"]["get"]["responses"]
    code, health = hub.call("alice", "GET", "health")
    assert code == 200, health
    assert health["status"] == "ok", health
    code, body = hub.call("alice", "GET", "no/such/endpoint")
    assert code == 404, body
    assert "openapi.json" in body["message"], body


# -- ownership -----------------------------------------------------------------------------------


async def test_alice_streams_her_cell_live_and_owns_it_whatever_she_claims(hub: Hub) -> None:
    # the owner comes from the hub, never from the client: a `user` query is not taken...
    r = requests.post(
        f"{hub.service_url}api/executions",
        params={"user": "bob"},
        json={"code": FOREVER},
        headers=hub.headers("alice"),
        timeout=60,
    )
    assert r.status_code == 201, r.text
    execution = r.json()
    assert execution["user"] == "alice"
    assert r.headers["Location"] == f"/services/crucible/api/executions/{execution['id']}"
    # ...and a `user` field in the body is refused, nothing is stored
    code, body = hub.call("alice", "POST", "executions", json={"code": "1", "user": "bob"})
    assert code == 400, body
    assert body["field"] == "user", body

    conn = await ws(hub, "alice", f"executions/{execution['id']}/stream")
    try:
        seen: list[dict] = []
        while True:
            event = await read_json(conn)
            assert event is not None, f"closed before the first output: {seen}"
            seen.append(event)
            if event["type"] == "stream" and "first" in event["text"]:
                break
        # the output arrived while the cell runs (it never ends by itself): live
        code, now = hub.call("alice", "GET", f"executions/{execution['id']}")
        assert code == 200, now
        assert now["status"] == "running", now
        cancel(hub, "alice", execution["id"])
        while (event := await read_json(conn)) is not None:
            seen.append(event)
        assert seen[-1]["type"] == "status", seen
        assert seen[-1]["status"] == "cancelled", seen
    finally:
        await close_ws(conn)


async def test_bob_cannot_see_alices_executions_anywhere(hub: Hub) -> None:
    bobs_feed = await ws(hub, "bob", "changes")
    try:
        alices = submit(hub, "alice", "print('secret of alice')")
        done = wait_status(hub, "alice", alices["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert "secret of alice" in stdout_of(done), done

        unknown = str(uuid.uuid4())
        _, unknown_body = hub.call("bob", "GET", f"executions/{unknown}")
        code, body = hub.call("bob", "GET", f"executions/{alices['id']}")
        not_yours = {
            **unknown_body,
            "message": unknown_body["message"].replace(unknown, alices["id"]),
        }
        assert code == 404, body
        assert body == not_yours, body
        for method, path in (
            ("POST", f"executions/{alices['id']}/cancel"),
            ("DELETE", f"executions/{alices['id']}"),
            ("GET", f"queue?execution_id={alices['id']}"),
        ):
            code, body = hub.call("bob", method, path)
            assert code == 404, (method, path, body)
        stream = f"{hub.service_url}api/executions/{alices['id']}/stream"
        code, body = ws_refusal(stream, hub.headers("bob"))
        assert code == 404, body
        assert body == not_yours, body

        code, page = hub.call("bob", "GET", "executions?limit=500")
        assert code == 200, page
        assert all(e["user"] == "bob" for e in page["executions"]), page
        code, page = hub.call("bob", "GET", "executions?user=alice")
        assert code == 200, page
        assert page["executions"] == [], page
        code, stats = hub.call("bob", "GET", "stats?user=alice")
        assert code == 200, stats
        assert stats["total"] == 0, stats
        code, alice_stats = hub.call("alice", "GET", "stats")
        code, bob_stats = hub.call("bob", "GET", "stats")
        code, page = hub.call("bob", "GET", "executions?limit=500")
        assert bob_stats["total"] == len(page["executions"]), (bob_stats, page)
        assert alice_stats["total"] >= 1

        # bob's change feed: his own cell's notices arrive, none of alice's came before them
        bobs = submit(hub, "bob", "print('bob was here')")
        notices = []
        while True:
            notice = await read_json(bobs_feed)
            assert notice is not None
            notices.append(notice)
            if notice.get("id") == bobs["id"] and notice["status"] in ("succeeded", "failed"):
                break
        assert all(n.get("user") == "bob" for n in notices if "id" in n), notices
        assert alices["id"] not in {n.get("id") for n in notices}
    finally:
        await close_ws(bobs_feed)


async def test_admin_sees_everyone_and_cancels_bobs_cell(hub: Hub) -> None:
    admin_feed = await ws(hub, "admin", "changes")
    try:
        bobs = submit(hub, "bob", FOREVER)
        alices = submit(hub, "alice", "print('alice for the admin')")
        wait_status(hub, "bob", bobs["id"], {"running"})
        wait_status(hub, "alice", alices["id"], {"succeeded"})

        code, page = hub.call("admin", "GET", "executions?limit=500")
        assert code == 200, page
        ids = {e["id"]: e["user"] for e in page["executions"]}
        assert ids[bobs["id"]] == "bob"
        assert ids[alices["id"]] == "alice"
        code, page = hub.call("admin", "GET", "executions?user=bob&limit=500")
        assert {e["user"] for e in page["executions"]} == {"bob"}
        code, stats = hub.call("admin", "GET", "stats")
        assert stats["total"] == len(ids), (stats, len(ids))
        code, body = hub.call("admin", "GET", f"executions/{alices['id']}")
        assert code == 200
        assert "alice for the admin" in stdout_of(body)

        assert cancel(hub, "admin", bobs["id"])["status"] == "cancelled"
        code, body = hub.call("bob", "GET", f"executions/{bobs['id']}")
        assert body["status"] == "cancelled", body
        assert body["user"] == "bob", body

        users = set()
        while not {"alice", "bob"} <= users:
            notice = await read_json(admin_feed)
            assert notice is not None
            users.add(notice.get("user"))
    finally:
        await close_ws(admin_feed)


def test_per_user_limit_holds_across_the_service_and_queue_counts_everyone(hub: Hub) -> None:
    # the service runs with max_concurrency_per_user=1 (and room for 4 at once)
    first = submit(hub, "alice", FOREVER)
    second = submit(hub, "alice", FOREVER)
    bobs = submit(hub, "bob", FOREVER)
    try:
        wait_status(hub, "alice", first["id"], {"running"})
        wait_status(hub, "bob", bobs["id"], {"running"})  # alice's limit is not bob's
        code, body = hub.call("alice", "GET", f"executions/{second['id']}")
        assert body["status"] == "queued", body
        code, queue = hub.call("bob", "GET", "queue")
        assert code == 200, queue
        assert queue["queued"] >= 1, queue
        assert queue["per_user_limit"] == 1, queue
        code, queue = hub.call("alice", "GET", f"queue?execution_id={second['id']}")
        assert queue["position"] == 1, queue
    finally:
        for who, e in (("alice", second), ("alice", first), ("bob", bobs)):
            hub.call(who, "POST", f"executions/{e['id']}/cancel")
