"""A JupyterHub user server in remote mode (issue 10, item 4): its crucible API forwards to
the hub's service with the server's own token; no dispatcher or database in the server."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.helpers.hub import (
    CRUCIBLE,
    GUARD_SECONDS,
    Hub,
    UserServer,
    close_ws,
    user_server,
    ws_refusal,
)

pytestmark = pytest.mark.hub


@pytest.fixture(scope="module")
def alice_server(hub: Hub) -> Iterator[UserServer]:
    """alice's user server, started through the hub's API, stopped afterwards."""
    with user_server(hub, "alice") as server:
        yield server


def test_a_cell_through_alices_server_runs_at_the_service_as_alice(
    hub: Hub, alice_server: UserServer
) -> None:
    code, execution, r = alice_server.call(
        "POST", "executions", json={"code": "print('via the server')"}
    )
    assert code == 201, execution
    assert execution["user"] == "alice"
    assert r.headers["Location"] == f"/user/alice/crucible/api/executions/{execution['id']}"

    # the service recorded it, as alice (the admin looks at the service directly)
    code, at_service = hub.call("admin", "GET", f"executions/{execution['id']}")
    assert code == 200, at_service
    assert at_service["user"] == "alice", at_service

    deadline = time.monotonic() + GUARD_SECONDS
    while (body := alice_server.call("GET", f"executions/{execution['id']}")[1])["status"] != (
        "succeeded"
    ):
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert any(e.get("text") == "via the server\n" for e in body["events"]), body

    # nothing of crucible's lives in the user server
    home = hub.dir / "home" / "alice"
    assert not list(home.rglob("crucible.db")), list(home.rglob("*.db"))


async def test_streams_and_history_through_the_server_are_alices_only(
    hub: Hub, alice_server: UserServer
) -> None:
    bobs = hub.call("bob", "POST", "executions", json={"code": "print('bob')"})[1]
    code, execution, _ = alice_server.call(
        "POST", "executions", json={"code": "print('streamed', flush=True)"}
    )
    assert code == 201, execution
    url = f"{alice_server.api.replace('http://', 'ws://', 1)}executions/{execution['id']}/stream"
    conn = await websocket_connect(HTTPRequest(url, headers=hub.headers("alice")))
    events = []
    try:
        while (message := await conn.read_message()) is not None:
            events.append(json.loads(message))
    finally:
        await close_ws(conn)
    assert events[-1]["type"] == "status", events
    assert events[-1]["status"] == "succeeded", events
    assert "streamed\n" in [e.get("text") for e in events]

    code, page, _ = alice_server.call("GET", "executions", params={"limit": 500})
    assert code == 200, page
    assert {e["user"] for e in page["executions"]} == {"alice"}, page
    code, body, _ = alice_server.call("GET", f"executions/{bobs['id']}")
    assert code == 404, body
    unknown = str(uuid.uuid4())
    code, body, _ = alice_server.call("GET", f"executions/{unknown}")
    assert code == 404, body
    assert unknown in body["message"], body
    assert "GET /user/alice/crucible/api/executions" in body["message"], body
    assert "/services/crucible/" not in body["message"], body
    code, body = ws_refusal(
        f"{alice_server.api}executions/{bobs['id']}/stream", hub.headers("alice")
    )
    assert code == 404, body
    assert bobs["id"] in body["message"], body
    code, doc, _ = alice_server.call("GET", "openapi.json")
    assert code == 200, doc
    assert doc["servers"] == [{"url": "/user/alice/crucible/api"}], doc


@pytest.mark.parametrize(("who", "ok"), [("alice", True), ("alice-noscope", False)])
def test_doctor_in_a_user_server_checks_the_service_and_the_token(
    hub: Hub, who: str, ok: bool
) -> None:
    env = {
        **os.environ,
        "CRUCIBLE_SERVICE_URL": hub.service_url,
        "JUPYTERHUB_API_TOKEN": hub.tokens[who],
    }
    done = subprocess.run(
        [str(CRUCIBLE), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    report = json.loads(done.stdout)
    assert report["ok"] is ok, (report, done.stderr)
    assert done.returncode == (0 if ok else 1), (report, done.stderr)
    service, token = report["checks"]
    assert service["ok"], service
    assert token["ok"] is ok, token
    if not ok:
        assert "access:services!service=crucible" in token["detail"]
        assert "c.Spawner.server_token_scopes" in token["fix"]


def test_doctor_in_a_user_server_says_the_service_is_unreachable(hub: Hub) -> None:
    nowhere = f"http://127.0.0.1:{hub.spare_port}/services/crucible/"  # nothing listens
    env = {**os.environ, "CRUCIBLE_SERVICE_URL": nowhere, "JUPYTERHUB_API_TOKEN": "x"}
    done = subprocess.run(
        [str(CRUCIBLE), "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    report = json.loads(done.stdout)
    assert done.returncode == 1, (report, done.stderr)
    (service,) = report["checks"]
    assert not service["ok"], service
    assert f"the crucible service at {nowhere} is unreachable" in service["detail"], service
    assert "crucible serve" in service["fix"], service
