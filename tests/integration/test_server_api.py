"""The crucible REST + WebSocket API against a real Jupyter server, dispatcher and sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests.helpers.jupyter import LONG, kernel_headers, submit, wait_status, wait_terminal

ACTIVE = ("queued", "starting", "running")
# -- the happy paths -----------------------------------------------------------------------------


def test_submit_get_and_outputs(api, jp_serverapp, jp_base_url):
    code, execution, response = api(
        "POST",
        "executions",
        body={"code": "import sys\nprint('hi')\nprint('oops', file=sys.stderr)\n", "tags": ["t1"]},
    )
    assert code == 201
    assert response.headers["Location"] == f"{jp_base_url}crucible/api/executions/{execution['id']}"
    assert execution["status"] == "queued"
    assert execution["tags"] == ["t1"]
    # the user recorded is the jupyter_server identity of the caller
    assert execution["user"]
    assert execution["user"] != "local"

    final = wait_terminal(api, execution["id"])
    assert final["status"] == "succeeded", final
    streams = [(e["name"], e["text"]) for e in final["events"] if e["type"] == "stream"]
    assert ("stdout", "hi\n") in streams
    assert ("stderr", "oops\n") in streams
    seqs = [e["seq"] for e in final["events"]]
    assert seqs == list(range(len(seqs)))
    statuses = [e["status"] for e in final["events"] if e["type"] == "status"]
    assert statuses[0] == "queued"
    assert statuses[-1] == "succeeded"

    _, later, _ = api("GET", "executions", execution["id"], params={"after": seqs[-2]})
    assert [e["seq"] for e in later["events"]] == [seqs[-1]]


def test_failing_cell_is_recorded_with_its_error(api):
    execution = submit(api, {"code": "raise ValueError('bad input')"})
    final = wait_terminal(api, execution["id"])
    assert final["status"] == "failed"
    errors = [e for e in final["events"] if e["type"] == "error"]
    assert errors
    assert errors[0]["ename"] == "ValueError"
    assert errors[0]["evalue"] == "bad input"
    assert any("ValueError" in line for line in errors[0]["traceback"])


def test_list_filters_and_pages(api, crucible_app):
    # the kernel credential is one stable user (token requests are anonymous, one per request)
    headers = kernel_headers(crucible_app)
    ids = [
        submit(api, {"code": f"print({i})", "tags": [f"batch{i % 2}"]}, headers=headers)["id"]
        for i in range(5)
    ]
    for i in ids:
        wait_terminal(api, i)
    code, page, _ = api("GET", "executions", params={"limit": 2})
    assert code == 200
    assert len(page["executions"]) == 2
    assert page["next_cursor"]
    seen = [e["id"] for e in page["executions"]]
    while page["next_cursor"]:
        _, page, _ = api("GET", "executions", params={"limit": 2, "cursor": page["next_cursor"]})
        seen += [e["id"] for e in page["executions"]]
    assert seen == list(reversed(ids))  # newest first, no repeats, none skipped

    _, tagged, _ = api("GET", "executions", params={"tag": "batch0"})
    assert {e["id"] for e in tagged["executions"]} == {ids[0], ids[2], ids[4]}
    _, done, _ = api("GET", "executions", params={"status": "succeeded", "limit": 500})
    assert len(done["executions"]) == 5
    _, none, _ = api("GET", "executions", params={"status": "failed"})
    assert none["executions"] == []
    _, mine, _ = api("GET", "executions", params={"user": crucible_app.kernel_user})
    assert len(mine["executions"]) == 5
    _, nobody, _ = api("GET", "executions", params={"user": "someone-else"})
    assert nobody["executions"] == []
    _, future, _ = api("GET", "executions", params={"since": "2999-01-01T00:00:00Z"})
    assert future["executions"] == []
    _, past, _ = api("GET", "executions", params={"until": "2000-01-01T00:00:00"})
    assert past["executions"] == []
    now_ms = int(time.time() * 1000) + 1000
    _, window, _ = api("GET", "executions", params={"since": 0, "until": now_ms})
    assert len(window["executions"]) == 5


@pytest.mark.parametrize("how", ["POST cancel", "DELETE"])
def test_cancel_running_then_conflict(api, how):
    execution = submit(api, {"code": LONG})
    wait_status(api, execution["id"], "running")
    if how == "DELETE":
        code, body, _ = api("DELETE", "executions", execution["id"])
    else:
        code, body, _ = api("POST", "executions", execution["id"], "cancel", body={})
    assert code == 200, body
    final = wait_terminal(api, execution["id"])
    assert final["status"] == "cancelled"
    code, body, _ = api("POST", "executions", execution["id"], "cancel", body={})
    assert code == 409
    assert body["error"] == "Conflict"
    code, body, _ = api("DELETE", "executions", execution["id"])
    assert code == 409


# -- the WebSocket stream ------------------------------------------------------------------------


def _read_all(run, ws) -> list[dict[str, Any]]:
    out = []
    while True:
        message = run(ws.read_message())
        if message is None:
            ws.close()
            return out
        out.append(json.loads(message))


def test_stream_live_then_resume(api, jp_ws_fetch, run):
    code = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.1)\n"
    execution = submit(api, {"code": code})
    ws = run(jp_ws_fetch("crucible", "api", "executions", execution["id"], "stream"))
    events = _read_all(run, ws)
    assert ws.close_code == 1000
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "status"
    assert events[-1]["status"] == "succeeded"
    text = "".join(e["text"] for e in events if e["type"] == "stream")
    assert text == "0\n1\n2\n3\n4\n"

    # resuming after a seq sends exactly what came after it
    mid = events[3]["seq"]
    ws = run(
        jp_ws_fetch(
            "crucible", "api", "executions", execution["id"], "stream", params={"after": mid}
        )
    )
    rest = _read_all(run, ws)
    assert rest == events[mid + 1 :]


def test_stream_errors_before_upgrade(api, jp_ws_fetch, run):
    with pytest.raises(HTTPClientError) as e:
        run(
            jp_ws_fetch(
                "crucible", "api", "executions", "01234567-89ab-7def-8123-456789abcdef", "stream"
            )
        )
    assert e.value.code == 404
    with pytest.raises(HTTPClientError) as e:
        run(jp_ws_fetch("crucible", "api", "executions", "nope", "stream"))
    assert e.value.code == 404
    execution = submit(api, {"code": "print(1)"})
    with pytest.raises(HTTPClientError) as e:
        run(
            jp_ws_fetch(
                "crucible", "api", "executions", execution["id"], "stream", params={"after": "x"}
            )
        )
    assert e.value.code == 400
    # a plain GET (no Upgrade) is a JSON 400, not tornado's text error
    code, body, _ = api("GET", "executions", execution["id"], "stream")
    assert code == 400
    assert body["error"] == "InvalidRequest"


class TestServerActivity:
    """What idle culling sees: ``/api/status``'s ``last_activity`` (the status request itself
    does not count as activity) advances while an execution runs, and stops once it ended."""

    @pytest.fixture
    def crucible_config(self):
        return {"CrucibleApp": {"activity_interval": 0.1}}

    def last_activity(self, jp_fetch, run) -> float:
        response = run(jp_fetch("api", "status"))
        stamp = json.loads(response.body)["last_activity"]
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    def test_running_executions_keep_the_server_active(self, api, jp_fetch, run):
        execution = submit(api, {"code": LONG})
        wait_status(api, execution["id"], "running")
        quiet_since = time.time()  # no request that counts as activity after this
        api.sleep(1.0)
        assert self.last_activity(jp_fetch, run) > quiet_since + 0.5
        api("POST", "executions", execution["id"], "cancel", body={})
        wait_terminal(api, execution["id"])
        api.sleep(0.5)  # the last touch of a busy dispatcher may land just after the end
        idle_since = time.time()
        api.sleep(1.0)
        assert self.last_activity(jp_fetch, run) < idle_since


SETTINGS = (
    "--CrucibleApp.kernel_user",
    "--CrucibleApp.max_body_bytes",
    "--CrucibleDispatcher.max_concurrency",
    "--CrucibleDispatcher.db_url",
    "--CrucibleLocalBackend.tmp_size",
    "--CrucibleKubernetesBackend.namespace",
)


def _jupyter(*args, env=None):
    jupyter = Path(sys.executable).with_name("jupyter")
    done = subprocess.run(
        [str(jupyter), *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("app", ["server", "crucible"])
def test_help_all_lists_the_settings(app):
    out = _jupyter(app, "--help-all")
    for name in SETTINGS:
        assert name in out, name


def test_plain_help_stays_short():
    """The settings join the full help only; `--help` is jupyter_server's own."""
    out = _jupyter("server", "--help")
    assert "--CrucibleDispatcher" not in out


def test_generated_config_documents_the_settings(tmp_path):
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path)}
    _jupyter("server", "--generate-config", "-y", env=env)
    text = (tmp_path / "jupyter_server_config.py").read_text()
    for name in ("c.CrucibleApp.kernel_env", "c.CrucibleDispatcher.backend"):
        assert name in text, name


def test_changes_tell_of_every_status_as_it_is_recorded(api, jp_ws_fetch, run):
    ws = run(jp_ws_fetch("crucible", "api", "changes"))
    ok = submit(api, {"code": "print(1)"})
    bad = submit(api, {"code": "1/0"})
    seen: dict[str, list[str]] = {ok["id"]: [], bad["id"]: []}
    while seen[ok["id"]][-1:] != ["succeeded"] or seen[bad["id"]][-1:] != ["failed"]:
        notice = json.loads(run(asyncio.wait_for(ws.read_message(), 30)))
        seen[notice["id"]].append(notice["status"])
        # sent once stored: the record already says so
        _, record, _ = api("GET", "executions", notice["id"])
        assert record["status"] == notice["status"] or notice["status"] in ACTIVE, record
        assert notice["user"] == record["user"]
    assert seen[ok["id"]] == ["queued", "starting", "running", "succeeded"]
    assert seen[bad["id"]] == ["queued", "starting", "running", "failed"]
    ws.close()


def test_changes_errors_before_upgrade(api, jp_ws_fetch, run):
    code, body, _ = api("GET", "changes")
    assert code == 400, body
    assert "WebSocket" in body["message"], body
    with pytest.raises(HTTPClientError) as e:
        run(jp_ws_fetch("crucible", "api", "changes", params={"status": "running"}))
    assert e.value.code == 400


def test_stream_subscribers_come_and_go(api, jp_ws_fetch, run):
    """A client that leaves mid-stream does not disturb the execution or other subscribers."""
    code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.1)\n"
    execution = submit(api, {"code": code})
    leaver = run(jp_ws_fetch("crucible", "api", "executions", execution["id"], "stream"))
    stayer = run(jp_ws_fetch("crucible", "api", "executions", execution["id"], "stream"))
    assert json.loads(run(leaver.read_message()))["seq"] == 0
    leaver.close()
    events = _read_all(run, stayer)
    assert events[-1]["status"] == "succeeded"
    assert "".join(e["text"] for e in events if e["type"] == "stream") == "0\n1\n2\n3\n4\n5\n"
    assert wait_terminal(api, execution["id"])["status"] == "succeeded"
