"""Pure builders of the Kubernetes objects one execution needs (no I/O, easy to test).

* a ConfigMap with the cell and the runner (code reaches the pod without any network),
  owned by the Job so deleting the Job deletes it;
* a Job (``backoffLimit: 0``, ``restartPolicy: Never``, ``activeDeadlineSeconds`` as a
  backstop, ``ttlSecondsAfterFinished``) whose pod is hardened: a non-root UID of its own
  (no per-user kernel limit shared with another execution), no privilege escalation,
  read-only root, all capabilities dropped, crucible's seccomp profile (or RuntimeDefault),
  no service-account token, no service links, a size-limited in-memory ``emptyDir``
  ``/tmp``, an ``ephemeral-storage`` limit (its log is on the node's disk) and a
  termination message file the cell cannot reach (see :data:`TERMINATION_MESSAGE_PATH`);
* the deny-all NetworkPolicy selecting every executor pod;
* for warm pods (see ``warm.py``): the same Job with the cell coming on stdin, the labels
  of the pool, and the JSON patch that claims a warm pod for one execution.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from typing import Any

LABEL_PREFIX = "crucible.jupyter.org"
APP_LABEL = "app.kubernetes.io/name"
APP = "crucible-executor"
EXECUTION_LABEL = f"{LABEL_PREFIX}/execution"
USER_LABEL = f"{LABEL_PREFIX}/user"
DISPATCHER_LABEL = f"{LABEL_PREFIX}/dispatcher"
POOL_LABEL = f"{LABEL_PREFIX}/pool"  # what a warm pod can run (see pool_key)
STATE_LABEL = f"{LABEL_PREFIX}/state"  # of a warm pod: warming, warm, claimed, retired
POLICY_NAME = "crucible-executors-deny-all"
#: The line a warm pod's runner writes (first, on its log) once it is isolated and waits.
READY_LINE = "crucible-warm-pod-ready"
MOUNT = "/opt/crucible"
#: Kubernetes' ConfigMap limit: the sizes of all its values together (``data`` and
#: ``binaryData``), 1 MiB.
CONFIGMAP_MAX_BYTES = 1 << 20
#: Where the kubelet mounts the container's termination message file. That file is on the
#: node's disk, mode 0666, outside every limit (a cell wrote 256 MiB to the default,
#: ``/dev/termination-log``); under ``/root`` (mode 0700, root's, in every common base
#: image) the container's non-root user cannot open it. Nothing reads it: outcomes come
#: from the exit code.
TERMINATION_MESSAGE_PATH = "/root/.crucible-termination-log"

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
    """The ConfigMap carrying ``cell.py`` and ``runner.py`` into the pod. The cell travels
    as ``binaryData`` (base64): as a JSON string, text full of control characters would grow
    sixfold (``\\u0001``) past the API server's request size; base64 grows it by a third."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"runner.py": runner_source},
        "binaryData": {"cell.py": base64.b64encode(code.encode("utf-8")).decode("ascii")},
    }


def configmap_room(runner_source: str) -> int:
    """The largest cell (UTF-8 bytes) a ConfigMap holds beside ``runner_source``."""
    return CONFIGMAP_MAX_BYTES - len(runner_source.encode("utf-8"))


def ephemeral_storage_for(output_limit: int) -> int:
    """The ``ephemeral-storage`` an executor pod needs: its log (the runner writes at most
    ``output_limit`` of output, plus 2 MiB of errors) with the kubelet's per-line prefix
    (~40 bytes, a lot for a flood of tiny frames), doubled, plus 16 MiB; the root is
    read-only and ``/tmp`` is in memory, so nothing else of the pod is on the node's disk."""
    return 2 * (output_limit + (2 << 20)) + (16 << 20)


def owner_reference(job: dict) -> dict:
    """An ownerReference to ``job`` (as returned by the API, with its uid)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "blockOwnerDeletion": False,
    }


def job_deadline(timeout: float, padding: int, *, warm: bool = False) -> int:
    """A Job's ``activeDeadlineSeconds``, the backstop behind the dispatcher's own bounds.
    It counts from the Job's creation, the wait for a node included: a cell's pod gets up
    to ``timeout`` to start (the dispatcher then ends the cell as never run) and its cell
    ``timeout`` to run once started, so a cold Job gets both, plus ``padding``. (With the
    timeout alone, a pod that waited for room got the deadline's SIGTERM mid-run: its cell
    failed with KeyboardInterrupt.) A warm pod's claim sets its pod's deadline from its
    start."""
    return (1 if warm else 2) * math.ceil(timeout) + padding


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
    seccomp_profile: str | None = None,
    output_limit: int | None = None,
    ephemeral_storage: int | None = None,
    tmp_size: int = 256 << 20,
    max_file_size: int = 256 << 20,
    deadline_padding: int = 15,
    ttl_seconds: int = 300,
    runtime_class: str | None = None,
    pull_policy: str = "IfNotPresent",
    priority_class: str | None = None,
    await_isolation: str | None = None,
    warm: bool = False,
) -> dict:
    """The Job running one execution's runner in a hardened pod.

    ``await_isolation`` (``HOST:PORT``) makes the runner wait until that address is no
    longer reachable before it runs the cell: NetworkPolicies take effect a moment after a
    pod starts, and the cell must not run in that moment.

    ``warm``: a warm pod's Job. Its runner, once isolated, writes :data:`READY_LINE` and
    waits for its cell on stdin (``stdin``/``stdinOnce``: the first attach sends it, and
    stdin closes when that attach ends); ``timeout`` is then how long it may wait unclaimed.

    ``uid``: the user (and group) the pod runs as: one per execution (see
    ``CrucibleKubernetesBackend.uid_range``). ``seccomp_profile``: a ``Localhost`` profile
    (a path under the kubelet's seccomp directory), else ``RuntimeDefault``.
    ``output_limit``: passed to the runner, which stops writing output past it.
    ``ephemeral_storage``: the pod's limit (and request) of node disk, in bytes.
    """
    seccomp = (
        {"type": "Localhost", "localhostProfile": seccomp_profile}
        if seccomp_profile
        else {"type": "RuntimeDefault"}
    )
    resources = {
        "requests": {"cpu": quantity_cpu(min(cpu, 0.25)), "memory": str(memory)},
        "limits": {"cpu": quantity_cpu(cpu), "memory": str(memory)},
    }
    if ephemeral_storage:
        for kind in ("requests", "limits"):
            resources[kind]["ephemeral-storage"] = str(ephemeral_storage)
    container: dict[str, Any] = {
        "name": "cell",
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": [
            python,
            "-I",
            f"{MOUNT}/runner.py",
            "--code-file",
            "-" if warm else f"{MOUNT}/cell.py",
            "--rlimit-fsize",
            str(max_file_size),
            *(["--output-limit", str(output_limit)] if output_limit else []),
            *(["--await-isolation", await_isolation] if await_isolation else []),
            *(["--ready-line", READY_LINE] if warm else []),
        ],
        "workingDir": "/tmp",
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": resources,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp,
        },
        "volumeMounts": [
            {"name": "crucible", "mountPath": MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
    }
    if warm:
        container.update(stdin=True, stdinOnce=True)
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
            "seccompProfile": seccomp,
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
            "activeDeadlineSeconds": job_deadline(timeout, deadline_padding, warm=warm),
            "ttlSecondsAfterFinished": ttl_seconds,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def pool_key(job: dict, runner_source: str) -> str:
    """A short hash of what a warm pod runs (its pod spec and runner): a dispatcher claims
    only warm pods whose key equals its own, so a claimed pod is the pod a cold Job of the
    same request would have been."""
    spec = job["spec"]["template"]["spec"]
    containers = json.loads(json.dumps(spec["containers"]))
    for container in containers:  # each warm pod has a uid of its own: not part of the key
        for key in ("runAsUser", "runAsGroup"):
            container.get("securityContext", {}).pop(key, None)
    text = json.dumps([containers, spec.get("runtimeClassName"), runner_source],
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def warm_labels(name: str, dispatcher: str, key: str) -> dict[str, str]:
    """Labels of a warm pod (and its Job) while no execution owns it: the execution label
    holds the Job's name, so the pod watch can follow it before it is claimed."""
    return {**labels(name, "crucible-pool", dispatcher), POOL_LABEL: key, STATE_LABEL: "warming"}


def _label_path(name: str) -> str:
    return "/metadata/labels/" + name.replace("~", "~0").replace("/", "~1")


def claim_patch(key: str, execution_id: str, user: str, dispatcher: str, deadline: int) -> list:
    """The JSON patch that claims a warm pod for one execution, atomically: it applies only
    if the pod is still warm for ``key`` (the API server checks the ``test`` operations and
    writes the pod in one step, so two dispatchers never claim the same pod). It also sets
    the pod's ``activeDeadlineSeconds`` (seconds since the pod started) as the backstop."""
    claimed = labels(execution_id, user, dispatcher)
    return [
        {"op": "test", "path": _label_path(STATE_LABEL), "value": "warm"},
        {"op": "test", "path": _label_path(POOL_LABEL), "value": key},
        {"op": "replace", "path": _label_path(STATE_LABEL), "value": "claimed"},
        *({"op": "replace", "path": _label_path(k), "value": v} for k, v in claimed.items()),
        {"op": "add", "path": "/spec/activeDeadlineSeconds", "value": deadline},
    ]


def state_patch(old: str, new: str) -> list:
    """The JSON patch moving a warm pod from state ``old`` to ``new``, only if in ``old``."""
    return [
        {"op": "test", "path": _label_path(STATE_LABEL), "value": old},
        {"op": "replace", "path": _label_path(STATE_LABEL), "value": new},
    ]


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
