"""Pure readers of executor pod state (no I/O, easy to test): what a pod, a Job or the
Job's events say about an execution, as raw API dicts. The builders of those objects are in
``objects.py``; whatever talks to the cluster is in ``cluster.py``.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from ..base import Outcome, reported_signal
from . import objects

Pod = dict[str, Any]

#: Labels naming the Job that made a pod (the first on Kubernetes >= 1.27).
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
#: Waiting reasons of a container that will not start by waiting longer -> what to say.
IMAGE_FAILURES = {
    "ErrImagePull": "image could not be pulled",
    "ImagePullBackOff": "image could not be pulled",
    "ErrImageNeverPull": "image not found",
    "InvalidImageName": "invalid image name",
    "CreateContainerConfigError": "container configuration error",
    "CreateContainerError": "container could not be created",
    "RunContainerError": "container could not be started",
}


def container(pod: Pod | None) -> dict:
    """The status of the pod's ``cell`` container ({} while there is none)."""
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") == "cell"), {})


def running(pod: Pod | None) -> bool:
    """Whether the pod's container runs."""
    return pod is not None and "running" in (container(pod).get("state") or {})


def terminated(pod: Pod | None) -> dict | None:
    """The ``terminated`` state of the pod's container, once it ended."""
    return (container(pod).get("state") or {}).get("terminated")


def job_of(pod: Pod) -> str | None:
    """The name of the Job that made ``pod``."""
    labels = pod["metadata"].get("labels") or {}
    return next((labels[k] for k in JOB_NAME_LABELS if k in labels), None)


def state_of(pod: Pod | None) -> str | None:
    """The warm-pool state of ``pod`` (None for a pod of a cold Job)."""
    return ((pod or {}).get("metadata", {}).get("labels") or {}).get(objects.STATE_LABEL)


def age(pod: Pod) -> float:
    """Seconds since the pod was created (0 when it does not say)."""
    created = pod["metadata"].get("creationTimestamp")
    if not created:
        return 0.0
    when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return max(0.0, time.time() - when.timestamp())


def start_failure(pod: Pod) -> str | None:
    """Why the pod's container will never start (a bad image, a pod that ended before its
    container did), else None."""
    state = container(pod).get("state") or {}
    if "running" in state or "terminated" in state:
        return None
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in IMAGE_FAILURES:
        image = container(pod).get("image") or "?"
        return (
            f"{IMAGE_FAILURES[waiting['reason']]}: {image}"
            f" ({waiting.get('message') or waiting['reason']})"
        )
    status = pod.get("status") or {}
    if status.get("phase") in ("Failed", "Succeeded") and not state:
        return status.get("message") or status.get("reason") or "pod failed"
    return None


def unschedulable(pod: Pod) -> str | None:
    """The scheduler's message while the pod cannot be scheduled, else None."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    cond: dict[str, Any] = next((c for c in conditions if c.get("type") == "PodScheduled"), {})
    if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
        return cond.get("message") or "no node fits"
    return None


def job_problem(events: list[dict]) -> str | None:
    """Why a Job could not create its pod, from its events (newest first), else None."""
    for ev in sorted(events, key=lambda e: e.get("lastTimestamp") or "", reverse=True):
        if ev.get("reason") == "FailedCreate":
            msg = ev.get("message", "")
            if "exceeded quota" in msg:
                return "resource quota exceeded: " + msg.split("forbidden: ", 1)[-1]
            return "the Job could not create its pod: " + msg
    return None


def outcome(pod: Pod | None, memory: str, *, cancelled: bool, end: dict | None) -> Outcome:
    """How the execution ended, from the last state of its pod (``memory``: its limit, as
    said in the OOM reason; ``end``: the runner's end frame, if it was read)."""
    term = terminated(pod) or {}
    status = (pod or {}).get("status") or {}
    if status.get("reason") == "Evicted":
        return Outcome(exit_code=None, reason=f"evicted: {status.get('message', '')}")
    if term.get("reason") == "OOMKilled":
        return Outcome(term.get("exitCode", 137), f"memory limit exceeded ({memory})")
    if not term:
        reason = None if cancelled else "the pod disappeared before it finished"
        return Outcome(exit_code=None, reason=reason)
    code = term.get("exitCode")
    return Outcome(exit_code=code, signal=reported_signal(end, code))


def end_frame(line: bytes) -> dict | None:
    """The runner's end frame as a dict, or None if it does not parse as one."""
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return frame if isinstance(frame, dict) else None


def job_execution(job: dict, pod: Pod | None) -> str | None:
    """The execution label a Job runs for; None for a warm pod no cell claimed."""
    labels = job["metadata"].get("labels") or {}
    if objects.POOL_LABEL not in labels:
        return labels.get(objects.EXECUTION_LABEL)
    for found in (pod, job):  # the pod is claimed first; its Job is labelled next
        if found is not None and state_of(found) == "claimed":
            return (found["metadata"].get("labels") or {}).get(objects.EXECUTION_LABEL)
    return None
