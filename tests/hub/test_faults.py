"""Faults between a user server in remote mode and the crucible service (issue 10, item 5):
the service down when a cell is submitted, and the service killed (SIGKILL) mid-cell and
started again. carol's server forwards to a service these tests start, kill and restart
themselves on ``Hub.spare_port`` (see tests.helpers.hub); cells come from her notebook kernels
(``%%crucible`` in a python3 kernel, and the crucible kernel), as JupyterLab sends them."""

from __future__ import annotations

import http.server
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crucible_jupyter.storage import Storage
from tests.helpers.hub import (
    GUARD_SECONDS,
    Hub,
    Kernel,
    Service,
    UserServer,
    stop_process,
    text_of,
    user_server,
)

pytestmark = pytest.mark.hub

SLOW = "import time\nprint('begun', flush=True)\ntime.sleep(3)\nprint('done', flush=True)\n"


@pytest.fixture(scope="module")
def carol(hub: Hub) -> Iterator[UserServer]:
    """carol's server; her crucible service is down unless a test starts it."""
    with user_server(hub, "carol") as server:
        yield server


@pytest.fixture
def carols_service(hub: Hub, tmp_path: Path) -> Iterator:
    """Start (again) the service carol's server forwards to, on its port and database."""
    started: list[Service] = []

    def start(*extra: str) -> Service:
        service = Service(
            tmp_path,
            hub.hub_api_direct,
            "--CrucibleDispatcher.max_concurrency_per_user=1",
            *extra,
            port=hub.spare_port,
            db_url=f"sqlite:///{tmp_path}/carol.db",
        )
        started.append(service)
        return service

    yield start
    for service in started:
        stop_process(service.proc, signal.SIGKILL)


def _unreachable(hub: Hub, message: str) -> None:
    where = f"http://127.0.0.1:{hub.spare_port}/services/crucible/"
    assert f"the crucible service at {where} is unreachable" in message, message
    assert "ask your JupyterHub administrator" in message, message


async def test_the_service_down_fails_the_cell_at_once_with_the_reason(
    hub: Hub, carol: UserServer
) -> None:
    # the REST API of carol's server: a 503 that says what is wrong, not a hang or a 500
    code, body, _ = carol.call("POST", "executions", json={"code": "print(1)"})
    assert code == 503, body
    assert body["error"] == "Unavailable"
    _unreachable(hub, body["message"])
    code, body, _ = carol.call("GET", "executions")
    assert code == 503, body
    _unreachable(hub, body["message"])

    # %%crucible in her python3 notebook: the cell fails with that reason
    async with Kernel(carol, "python3") as kernel:
        reply, _ = await kernel.run("%load_ext crucible_jupyter")
        assert reply["status"] == "ok", reply
        reply, outputs = await kernel.run("%%crucible\nprint('never runs')")
        assert reply["status"] == "error", reply
        _unreachable(hub, reply["evalue"])
        assert "never runs" not in text_of(outputs)

    # a cell of the crucible kernel: the same
    async with Kernel(carol, "crucible") as kernel:
        reply, outputs = await kernel.run("print('never runs')")
        assert reply["status"] == "error", reply
        _unreachable(hub, reply["evalue"])
        assert "never runs" not in text_of(outputs)


@pytest.mark.parametrize("when", ["output stored", "output only sent"])
async def test_the_service_killed_mid_cell_and_restarted(
    hub: Hub, carol: UserServer, carols_service, when: str
) -> None:
    """Killed once the cell's first output is stored, or as soon as the notebook has it
    (sent live, perhaps not stored yet: the restarted service may then number its recorded
    end at or below what the notebook saw; the notebook still gets that end)."""
    service = carols_service()
    async with Kernel(carol, "python3") as kernel:
        reply, _ = await kernel.run("%load_ext crucible_jupyter")
        assert reply["status"] == "ok", reply
        msg_id = kernel.execute(f"%%crucible\n{SLOW}")
        outputs: list = []
        while "begun" not in text_of(outputs):  # the cell runs
            message = await kernel.message(msg_id)
            if message["channel"] == "iopub":
                outputs.append(message)

        # a second cell of carol's waits behind it (one at a time for her)
        code, queued, _ = carol.call("POST", "executions", json={"code": "print('after')"})
        assert code == 201, queued
        code, page, _ = carol.call("GET", "executions", params={"status": "running"})
        assert code == 200, page
        (running,) = page["executions"]
        deadline = time.monotonic() + GUARD_SECONDS
        while when == "output stored":  # the kill comes once what it printed is in the
            # database (GET also shows events the service holds but has not written yet)
            with Storage(service.db_url) as storage:
                texts = [e.data.get("text") for e in storage.events(running["id"])]
            if "begun\n" in texts:
                break
            assert time.monotonic() < deadline, texts
            time.sleep(0.05)

        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait(GUARD_SECONDS)
        code, body, _ = carol.call("GET", f"executions/{running['id']}")
        assert code == 503, body  # down: said at once
        _unreachable(hub, body["message"])
        again = carols_service()

        # the cell ends, with the reason the restarted service recorded (or completes)
        reply, outputs = await kernel.finish(msg_id, outputs)
        shown = text_of(outputs)
        assert "begun" in shown, shown

    with Storage(again.db_url) as storage:
        record = storage.get(running["id"])
        events = storage.events(running["id"])
    assert record.status.value in ("failed", "succeeded"), record
    if record.status.value == "failed":
        assert reply["status"] == "error", reply
        assert record.reason, record
        assert record.reason in reply["evalue"] or record.reason in shown, (record, reply)
    else:
        assert reply["status"] == "ok", reply
    texts = [e.data.get("text") for e in events if e.type == "stream"]
    if when == "output stored":
        assert "begun\n" in texts, texts
    assert events[-1].type == "status", events[-1]
    assert events[-1].data["status"] == record.status.value
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), seqs  # each once, in order

    # the cell that had not started runs after the restart; nothing is left unfinished
    deadline = time.monotonic() + GUARD_SECONDS
    while (body := carol.call("GET", f"executions/{queued['id']}")[1])["status"] != "succeeded":
        assert body["status"] in ("queued", "starting", "running"), body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    for status in ("queued", "starting", "running"):
        code, page, _ = carol.call("GET", "executions", params={"status": status})
        assert code == 200, page
        assert page["executions"] == [], page


class NotTheService(http.server.BaseHTTPRequestHandler):
    """What may answer at the service's URL instead of the service: a proxy's error page for
    a backend that is down (503, HTML), or some other web server (200, HTML)."""

    status = 503

    def _page(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body>Service Unavailable</body></html>")

    do_GET = do_POST = _page

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status", [503, 200])
def test_something_else_at_the_service_url_is_a_clear_503(
    hub: Hub, carol: UserServer, status: int
) -> None:
    handler = type("Page", (NotTheService,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", hub.spare_port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, body, _ = carol.call("POST", "executions", json={"code": "print(1)"})
    finally:
        server.shutdown()
        server.server_close()
    assert code == 503, body
    if status == 503:
        _unreachable(hub, body["message"])
        assert "HTTP 503" in body["message"], body
    else:
        assert "not the crucible API" in body["message"], body
        assert "CRUCIBLE_SERVICE_URL" in body["message"], body
