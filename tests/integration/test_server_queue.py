"""Queue status, positions, statistics and health with one execution slot."""

from __future__ import annotations

import json

import pytest

from tests.helpers.jupyter import LONG, submit, wait_status, wait_terminal


@pytest.fixture
def crucible_config():
    """One execution at a time, so a second one waits in the queue."""
    return {"CrucibleDispatcher": {"max_concurrency": 1}}


def test_queue_position_stats_health(api):
    first = submit(api, {"code": LONG})
    wait_status(api, first["id"], "running")
    second = submit(api, {"code": "print(2)", "priority": "low"})
    code, queue, _ = api("GET", "queue", params={"execution_id": second["id"]})
    assert code == 200
    assert queue["position"] == 1
    assert queue["running"] == 1
    assert queue["capacity"] == 1
    assert queue["depth"]["low"] == 1
    code, health, _ = api("GET", "health")
    assert code == 200
    assert health["status"] == "ok"
    assert health["busy"] is True
    api("POST", "executions", first["id"], "cancel", body={})
    assert wait_terminal(api, second["id"])["status"] == "succeeded"
    code, stats, _ = api("GET", "stats")
    assert code == 200
    blob = json.dumps(stats)
    assert "succeeded" in blob
    assert "cancelled" in blob
    code, _, _ = api("GET", "stats", params={"since": "2999-01-01"})
    assert code == 200


def test_queue_unknown_execution_is_404(api):
    code, body, _ = api(
        "GET", "queue", params={"execution_id": "01234567-89ab-7def-8123-456789abcdef"}
    )
    assert code == 404
    assert body["error"] == "NotFound"
