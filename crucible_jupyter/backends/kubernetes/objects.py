"""Pure builders of the Kubernetes objects one execution needs (no I/O, easy to test).

* a ConfigMap with the cell and the runner (code reaches the pod without any network),
  owned by the Job so deleting the Job deletes it;
* a Job (``backoffLimit: 0``, ``restartPolicy: Never``, ``activeDeadlineSeconds`` as a
  backstop, ``ttlSecondsAfterFinished``) whose pod is hardened: fixed non-root UID, no
  privilege escalation, read-only root, all capabilities dropped, seccomp RuntimeDefault,
  no service-account token, no service links, a size-limited in-memory ``emptyDir``
  ``/tmp``;
* the deny-all NetworkPolicy selecting every executor pod.
"""

from __future__ import annotations

import hashlib
import math
import re

LABEL_PREFIX = "crucible.jupyter.org"
APP_LABEL = "app.kubernetes.io/name"
APP = "crucible-executor"
EXECUTION_LABEL = f"{LABEL_PREFIX}/execution"
USER_LABEL = f"{LABEL_PREFIX}/user"
DISPATCHER_LABEL = f"{LABEL_PREFIX}/dispatcher"
POLICY_NAME = "crucible-executors-deny-all"
MOUNT = "/opt/crucible"

_LABEL_OK = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def label_value(text: str) -> str:
    """``text`` as a valid label value: itself when valid, else a readable slug + hash."""
    if _LABEL_OK.match(text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:48].strip("-_.")
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else f"x-{digest}"


def job_name(execution_id: str) -> str:
    """The DNS-safe, unique name of an execution's Job, pod prefix and ConfigMap."""
    safe = re.sub(r"[^a-z0-9-]", "", execution_id.lower())[:52].strip("-")
    return f"crucible-{safe}"


def labels(execution_id: str, user: str, dispatcher: str) -> dict[str, str]:
    """Labels on every object of an execution (the NetworkPolicy selects ``APP_LABEL``)."""
    return {
        APP_LABEL: APP,
        EXECUTION_LABEL: label_value(execution_id),
        USER_LABEL: label_value(user),
        DISPATCHER_LABEL: label_value(dispatcher),
    }


def quantity_cpu(cores: float) -> str:
    """CPU cores as a Kubernetes quantity in millicores (``0.5`` → ``500m``)."""
    return f"{max(1, math.ceil(cores * 1000))}m"


def make_configmap(name: str, code: str, runner_source: str, labels: dict) -> dict:
    """The ConfigMap carrying ``cell.py`` and ``runner.py`` into the pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"cell.py": code, "runner.py": runner_source},
    }


def owner_reference(job: dict) -> dict:
    """An ownerReference to ``job`` (as returned by the API, with its uid)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "blockOwnerDeletion": False,
    }


def make_job(
    *,
    name: str,
    labels: dict,
    image: str,
    python: str,
    cpu: float,
    memory: int,
    timeout: float,
    env: dict[str, str],
    uid: int = 65534,
    tmp_size: int = 256 << 20,
    max_file_size: int = 256 << 20,
    deadline_padding: int = 15,
    ttl_seconds: int = 300,
    runtime_class: str | None = None,
    pull_policy: str = "IfNotPresent",
    priority_class: str | None = None,
    await_isolation: str | None = None,
) -> dict:
    """The Job running one execution's runner in a hardened pod.

    ``await_isolation`` (``HOST:PORT``) makes the runner wait until that address is no
    longer reachable before it runs the cell: NetworkPolicies take effect a moment after a
    pod starts, and the cell must not run in that moment.
    """
    container = {
        "name": "cell",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": [
            python,
            "-I",
            f"{MOUNT}/runner.py",
            "--code-file",
            f"{MOUNT}/cell.py",
            "--rlimit-fsize",
            str(max_file_size),
            *(["--await-isolation", await_isolation] if await_isolation else []),
        ],
        "workingDir": "/tmp",
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": {
            "requests": {"cpu": quantity_cpu(min(cpu, 0.25)), "memory": str(memory)},
            "limits": {"cpu": quantity_cpu(cpu), "memory": str(memory)},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "crucible", "mountPath": MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePolicy": "File",
    }
    pod_spec: dict = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 3,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "crucible", "configMap": {"name": name, "defaultMode": 0o444}},
            # in memory: a tmpfs whose size is the limit at every write, counted toward the
            # pod's memory (on disk, sizeLimit is only checked by the kubelet's periodic
            # eviction, after a cell may already have filled the node's disk)
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(tmp_size)}},
        ],
    }
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    if priority_class:
        pod_spec["priorityClassName"] = priority_class
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": math.ceil(timeout) + deadline_padding,
            "ttlSecondsAfterFinished": ttl_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def make_network_policy() -> dict:
    """Deny all ingress and egress for every executor pod of the namespace."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": POLICY_NAME, "labels": {APP_LABEL: APP}},
        "spec": {
            "podSelector": {"matchLabels": {APP_LABEL: APP}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [],
        },
    }
