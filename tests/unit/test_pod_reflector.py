"""What the shared pod watch keeps of deleted pods (``PodReflector.gone``): only the last
state of executions someone holds, so it does not grow with every execution that ran.

The watch itself needs a cluster (tests/k8s/test_reflector_memory.py); what it keeps is
decided by ``_store`` / ``_forget`` from the events it is given, exercised here directly.
"""

from __future__ import annotations

import asyncio

from crucible_jupyter.backends.kubernetes.objects import EXECUTION_LABEL
from crucible_jupyter.backends.kubernetes.reflector import PodReflector


def pod(name: str, execution: str, phase: str = "Succeeded") -> dict:
    return {
        "metadata": {"name": name, "labels": {EXECUTION_LABEL: execution}},
        "status": {"phase": phase},
    }


def reflector() -> PodReflector:
    return PodReflector(None, "ns", "app=x")  # no watch is started: no API is needed


def test_a_deleted_pod_of_an_execution_nobody_holds_leaves_nothing():
    r = reflector()
    for i in range(100):
        r._store(pod(f"p{i}", f"e{i}", "Running"))
        r._forget(pod(f"p{i}", f"e{i}"))
    assert r.retained() == {"pods": 0, "gone": 0, "held": 0, "waits": 0}


def test_a_held_execution_keeps_its_pods_last_state_until_released():
    r = reflector()
    r.hold("e1")
    r._store(pod("p1", "e1", "Running"))
    r._forget(pod("p1", "e1"))
    assert r.gone["e1"]["status"]["phase"] == "Succeeded"
    r.release("e1")
    assert r.retained() == {"pods": 0, "gone": 0, "held": 0, "waits": 0}
    r._forget(pod("p1", "e1"))  # a late event after the release keeps nothing either
    assert not r.gone


def test_a_release_wakes_and_drops_a_wait_on_an_execution():
    async def main() -> None:
        r = reflector()
        r.hold("e1")
        seen = []

        def check(p: dict | None) -> bool:
            seen.append(p)
            return len(seen) > 1

        waiting = asyncio.ensure_future(r.wait_for("e1", check, timeout=30))
        await asyncio.sleep(0)
        assert r.retained()["waits"] == 1
        r.release("e1")
        assert await waiting
        assert r.retained() == {"pods": 0, "gone": 0, "held": 0, "waits": 0}

    asyncio.run(main())
