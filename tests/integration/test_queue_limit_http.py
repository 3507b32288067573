"""Past ``max_queued_per_user``, the API answers 429 with what to do, in JSON."""

from __future__ import annotations

import pytest


@pytest.fixture
def crucible_config():
    """One cell runs at a time; one more may wait per user."""
    return {"CrucibleDispatcher": {"max_concurrency": 1, "max_queued_per_user": 1}}


def test_submit_past_the_queue_limit_is_429(api):
    code, running, _ = api("POST", "executions", body={"code": "import time; time.sleep(60)"})
    assert code == 201
    for _ in range(200):  # it leaves the queue in a moment: then it runs, it does not wait
        if api("GET", "executions", running["id"])[1]["status"] != "queued":
            break
        api.sleep(0.05)
    code, waiting, _ = api("POST", "executions", body={"code": "print(1)"})
    assert code == 201
    code, body, _ = api("POST", "executions", body={"code": "print(2)"})
    assert code == 429
    assert body["error"] == "TooManyQueued"
    assert "already has 1 execution queued" in body["message"]
    assert "cancel some" in body["message"]
    code, _, _ = api("POST", "executions", waiting["id"], "cancel", body={})
    assert code == 200
    code, _, _ = api("POST", "executions", body={"code": "print(3)"})
    assert code == 201
