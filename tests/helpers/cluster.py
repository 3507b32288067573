"""The one way tests reach the development Kubernetes cluster (dev/cluster).

Both ``tests/cluster`` and ``tests/k8s`` get the cluster through the root conftest's
``kube`` fixture, which calls :func:`connect`. The kubeconfig is
``$CRUCIBLE_CLUSTER_KUBECONFIG``, else what ``dev/cluster/cluster kubeconfig`` prints;
kubectl is ``$CRUCIBLE_CLUSTER_KUBECTL``, else the one in ``dev/cluster/cluster bin-dir``.
When the API server does not answer ``/readyz`` the tests skip with the reason, unless
``CRUCIBLE_CLUSTER_REQUIRED=1`` (``dev/test`` as root, CI): then they fail. Tests that take
the shared cluster down and up again (marker ``cluster_restart``) run only with
``CRUCIBLE_CLUSTER_ALLOW_RESTART=1``, and after every other test of the session.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "dev" / "cluster" / "cluster"
REQUIRED_ENV = "CRUCIBLE_CLUSTER_REQUIRED"
ALLOW_RESTART_ENV = "CRUCIBLE_CLUSTER_ALLOW_RESTART"
T = TypeVar("T")


class ClusterUnreachable(Exception):
    """The dev cluster's API server cannot be reached; the message says why."""


def cluster_required() -> bool:
    """Whether an unreachable cluster is a failure (``CRUCIBLE_CLUSTER_REQUIRED=1``)."""
    return os.environ.get(REQUIRED_ENV) == "1"


def restart_allowed() -> bool:
    """Whether tests may take the shared cluster down and up (``CRUCIBLE_CLUSTER_ALLOW_RESTART=1``)."""
    return os.environ.get(ALLOW_RESTART_ENV) == "1"


RESTART_SKIP_REASON = (
    f"restarts the shared dev cluster; set {ALLOW_RESTART_ENV}=1 to allow it (dev/test as"
    " root and dev/cluster/ci.sh do)"
)


def cluster_script(*args: str, timeout: float = 60) -> str:
    """Run ``dev/cluster/cluster ARGS`` (a query such as ``kubeconfig``); its stdout, stripped."""
    return subprocess.run(
        [str(CLUSTER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout.strip()


class Kube:
    """kubectl bound to the dev cluster's kubeconfig."""

    def __init__(self, kubeconfig: str, kubectl: str) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl

    def env(self) -> dict[str, str]:
        """This process's environment with ``KUBECONFIG`` pointing at the dev cluster."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl ARGS``; with ``check``, AssertionError (with its output) if it fails."""
        done = subprocess.run(
            [self.kubectl, *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def out(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """``kubectl ARGS``; its stdout."""
        return self.run(*args, input=input, check=check).stdout

    def apply(self, manifest: dict[str, Any] | str, namespace: str | None = None) -> None:
        """``kubectl apply`` a manifest (a dict is sent as JSON)."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        args = ["apply", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        self.run(*args, input=text)

    def get_json(self, *args: str) -> dict[str, Any]:
        """``kubectl get -o json ARGS``, decoded."""
        return json.loads(self.run("get", "-o", "json", *args).stdout)

    def wait_for(
        self, predicate: Callable[[], T], timeout: float, interval: float = 0.5, what: str = ""
    ) -> T:
        """Poll ``predicate`` until it returns something truthy (returned); a failing kubectl
        (AssertionError) or a slow one counts as not yet. AssertionError after ``timeout``
        seconds, with the last value seen."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (AssertionError, subprocess.TimeoutExpired) as e:  # transient
                last = e
            else:
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what or predicate}: {last!r}"
        )


def connect() -> Kube:
    """The dev cluster, once its API server answers ``/readyz``; ClusterUnreachable otherwise."""
    try:
        kubeconfig = os.environ.get("CRUCIBLE_CLUSTER_KUBECONFIG") or cluster_script("kubeconfig")
        kubectl = os.environ.get("CRUCIBLE_CLUSTER_KUBECTL") or str(
            Path(cluster_script("bin-dir")) / "kubectl"
        )
    except (subprocess.SubprocessError, OSError) as e:
        raise ClusterUnreachable(f"{CLUSTER_SCRIPT} cannot say where the cluster is: {e}") from e
    for path in (kubeconfig, kubectl):
        if not os.path.exists(path):
            raise ClusterUnreachable(f"{path} does not exist")
    kube = Kube(kubeconfig, kubectl)
    try:
        kube.run("get", "--raw", "/readyz", timeout=30)
    except (AssertionError, subprocess.SubprocessError, OSError) as e:
        raise ClusterUnreachable(
            f"the API server (kubeconfig {kubeconfig}) is not ready: {e}"
        ) from e
    return kube


def namespace_report(kube: Kube, namespace: str, events: str | None = None) -> str:
    """Evidence for a failed test: the namespace's events (``events``: a log streamed while
    the test ran, else ``kubectl get events``), its pods with status and every container's log."""
    out = [f"===== events in namespace {namespace} ====="]
    if events is None:
        events = kube.out("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False)
    out.append(events)
    p = kube.run("get", "pods", "-n", namespace, "-o", "wide", check=False)
    out.append(f"===== pods in {namespace} =====\n{p.stdout}{p.stderr}")
    try:
        pods = kube.get_json("pods", "-n", namespace)["items"]
    except (AssertionError, ValueError, subprocess.SubprocessError) as e:
        pods = []
        out.append(f"(cannot list pods: {e})")
    for pod in pods:
        name = pod["metadata"]["name"]
        out.append(f"===== pod {name} status =====\n{json.dumps(pod.get('status', {}), indent=1)}")
        for c in pod["spec"].get("containers", []):
            lp = kube.run("logs", "-n", namespace, name, "-c", c["name"], check=False)
            out.append(f"===== logs {name}/{c['name']} =====\n{lp.stdout}{lp.stderr}")
    return "\n".join(out)


@functools.cache
def versions() -> dict[str, str]:
    """The settings of dev/cluster/versions.env (image names, versions, CIDRs), by name."""
    env = {}
    for line in (REPO / "dev" / "cluster" / "versions.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip().strip('"')
    return env


def pod_manifest(
    name: str, image: str, command: list[str], labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    """A bare Pod running ``command`` on a local ``image`` (never pulled), once, with no
    service account token; ``spec`` adds to (or replaces) its spec's fields."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                }
            ],
            **spec,
        },
    }


def pod_phase(kube: Kube, namespace: str, name: str) -> str | None:
    """The pod's phase (``Pending``, ``Running``, ``Succeeded``...), None before it has one."""
    return kube.get_json("pod", name, "-n", namespace).get("status", {}).get("phase")


def wait_running(kube: Kube, namespace: str, *names: str, timeout: float = 120) -> None:
    """Wait (bounded by ``timeout`` each) until every named pod is Running."""
    for n in names:
        kube.wait_for(
            lambda n=n: pod_phase(kube, namespace, n) == "Running", timeout, what=f"pod {n} Running"
        )


def pod_ip(kube: Kube, namespace: str, name: str) -> str:
    """The pod's IP address."""
    return kube.get_json("pod", name, "-n", namespace)["status"]["podIP"]


TCP_PROBE = r"""
import socket, sys, json
res = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        res[target] = True
    except OSError as e:
        res[target] = False
print(json.dumps(res))
"""


def tcp_reachable(kube: Kube, namespace: str, pod: str, *targets: str) -> dict[str, bool]:
    """From inside ``pod`` (it needs python3): which ``host:port`` targets accept a TCP
    connection within 2 s."""
    p = kube.run(
        "exec", "-n", namespace, pod, "--", "python3", "-c", TCP_PROBE, *targets, timeout=60
    )
    return json.loads(p.stdout.strip().splitlines()[-1])
