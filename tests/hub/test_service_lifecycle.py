"""The service process itself: SIGTERM with a grace period, everything persisted; a hub that
does not answer. Each test starts its own ``crucible serve`` (as an external hub service,
tokens checked by the session's real hub) and talks to it directly."""

from __future__ import annotations

import http.server
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from crucible_jupyter.storage import Storage
from tests.helpers.hub import GRACE, GUARD_SECONDS, Hub, Service, stop_process
from tests.helpers.net import free_port

pytestmark = pytest.mark.hub

SHORT = "import time\nprint('begun', flush=True)\ntime.sleep(0.5)\nprint('done', flush=True)\n"
FOREVER = "print('begun', flush=True)\nimport time\nwhile True:\n    time.sleep(0.05)\n"


@pytest.fixture
def service_factory(hub: Hub, tmp_path: Path) -> Iterator:
    started: list[Service] = []

    def start(*extra: str, hub_api: str | None = None) -> Service:
        service = Service(tmp_path, hub_api or hub.hub_api_direct, *extra)
        started.append(service)
        return service

    yield start
    for service in started:
        stop_process(service.proc, signal.SIGKILL)


def test_sigterm_lets_cells_finish_within_the_grace_period_then_ends_them(
    hub: Hub, service_factory
) -> None:
    service = service_factory("--CrucibleDispatcher.max_concurrency_per_user=2")
    ids = {}
    for name, code in (("short", SHORT), ("forever", FOREVER), ("queued", "print('later')")):
        status, body = service.call(hub, "alice", "POST", "executions", json={"code": code})
        assert status == 201, body
        ids[name] = body["id"]
    deadline = time.monotonic() + GUARD_SECONDS
    while True:  # both running cells have printed: they are under way
        status, body = service.call(hub, "alice", "GET", f"executions/{ids['forever']}")
        if any(e["type"] == "stream" for e in body["events"]):
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)

    service.proc.send_signal(signal.SIGTERM)
    while requests.get(f"{service.url}readyz", timeout=30).status_code == 200:
        assert time.monotonic() < deadline + GUARD_SECONDS
        time.sleep(0.02)
    r = requests.get(f"{service.url}readyz", timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["reason"] == "shutting down", r.text
    # draining: nothing new is accepted, what exists can still be read
    status, body = service.call(hub, "alice", "POST", "executions", json={"code": "print(2)"})
    assert status == 503, body
    assert "shutting down" in body["message"], body
    status, body = service.call(hub, "alice", "GET", f"executions/{ids['forever']}")
    assert status == 200, body

    assert service.proc.wait(GRACE + GUARD_SECONDS) == 0, service.log.read_text()

    with Storage(service.db_url) as storage:
        short = storage.get(ids["short"])
        forever = storage.get(ids["forever"])
        queued = storage.get(ids["queued"])
        short_text = "".join(e.data.get("text", "") for e in storage.events(ids["short"]))
        forever_events = storage.events(ids["forever"])
    assert short.status.value == "succeeded", short
    assert short_text == "begun\ndone\n"
    assert forever.status.value == "failed", forever
    assert forever.reason == (
        f"the crucible service shut down; the cell was still running after the {GRACE} s"
        " grace period"
    )
    assert forever_events[-1].type == "status"
    assert forever_events[-1].data["status"] == "failed"
    assert "begun\n" in [e.data.get("text") for e in forever_events]
    assert queued.status.value == "queued"  # kept for the next start, not failed

    # the next start runs what was left queued
    again = service_factory()
    assert again.db_url == service.db_url
    deadline = time.monotonic() + GUARD_SECONDS
    while (body := again.call(hub, "alice", "GET", f"executions/{ids['queued']}")[1])[
        "status"
    ] != "succeeded":
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_a_hub_that_does_not_answer_is_a_503_with_the_reason(hub: Hub, service_factory) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/hub/api"
    service = service_factory(hub_api=nowhere)
    status, body = service.call(hub, "alice", "GET", "executions")
    assert status == 503, body
    assert body["error"] == "Unavailable"
    assert nowhere in body["message"]
    assert "retry" in body["message"]


class FailingHub(http.server.BaseHTTPRequestHandler):
    """A hub API that is up but fails every request (500), as a hub with a broken database."""

    def do_GET(self) -> None:
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": 500, "message": "database is locked"}')

    def log_message(self, *args: object) -> None:
        pass


def test_a_hub_that_fails_is_a_503_with_the_reason(hub: Hub, service_factory) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        failing = f"http://127.0.0.1:{server.server_port}/hub/api"
        service = service_factory(hub_api=failing)
        status, body = service.call(hub, "alice", "GET", "executions")
        assert status == 503, body
        assert failing in body["message"], body
        assert "upstream problem" in body["message"], body
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_that_says_nothing_is_a_503_after_hub_timeout(hub: Hub, service_factory) -> None:
    silent = socket.socket()  # accepts connections (the kernel's backlog), never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    try:
        where = f"http://127.0.0.1:{silent.getsockname()[1]}/hub/api"
        service = service_factory("--CrucibleService.hub_timeout=1", hub_api=where)
        status, body = service.call(hub, "alice", "GET", "executions")
        assert status == 503, body
        assert "did not answer within 1 s" in body["message"], body
    finally:
        silent.close()
