"""Executors of the installed chart reach nothing; a control pod beside them reaches it all.

Issue 11: "executors reach nothing (a control pod that no policy selects proves the
policies are enforced)". The chart is installed on the dev cluster with its service
running (so the service's ClusterIP has a live endpoint) and the JupyterHub namespace set
to the executions namespace, so that the service's own ingress policy admits a pod there
labelled as the hub. In the executions namespace, two pods then probe the same targets:
the API server (its ClusterIP and its endpoint), the kubelet, the crucible service's
ClusterIP, CoreDNS (a name lookup and its ClusterIP) and every IPv6 address the cluster
lists for them (the dev cluster lists none; its pods have no IPv6 at all):

* the executor: the pod the backend's own ``make_job`` builds with the chart's rendered
  settings, running the real runner with the probe as its cell. It carries the hub's
  labels too, so that only the chart's deny-all (which selects it by the executor label)
  stands between it and the service. Everything must be refused;
* the control: a Pod Security `restricted` pod with the hub's labels, which no policy in
  the namespace selects. Everything must be reached: the executor's refusals come from
  the policy, not from the targets or the network.

Needs the service image (``localhost/crucible/service:dev``, ``dev/cluster/cluster
images``); without it the test skips saying so (fails with CRUCIBLE_CLUSTER_REQUIRED=1).
Run holding the shared cluster's lock:
``flock /tmp/crucible-k8s.lock .venv/bin/python -m pytest tests/helm/test_chart_isolation_on_cluster.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from traitlets.config import Config

from crucible_jupyter.backends.kubernetes import CrucibleKubernetesBackend, objects, probes
from crucible_jupyter.backends.kubernetes.backend import RUNNER
from crucible_jupyter.models import Resources

from .chart import EXAMPLES, selector_matches
from .cluster import Cluster, Release, installed

pytestmark = pytest.mark.k8s

SERVICE_IMAGE = "localhost/crucible/service:dev"
EXECUTOR_IMAGE = "localhost/crucible/executor:dev"
#: z2jh's labels of the hub pod, which the service's ingress policy admits
HUB_LABELS = {"component": "hub", "release": "jupyterhub"}
#: the control pod's labels: the hub's, and none a policy of the namespace selects by
CONTROL_LABELS = {**HUB_LABELS, "app.kubernetes.io/name": "crucible-isolation-control"}
NAME = "crucible-isolation"

#: One probe for both pods; ``TARGETS`` and ``MODE`` are prepended. The executor first
#: waits (20 s at most) until the first target, the API server's endpoint, stops answering
#: (as the runner's --await-isolation does: a policy takes effect a moment after a pod
#: starts), then tries every target once. The control tries each target for 20 s until it
#: answers (kube-router adds a new pod to its ipsets a moment after the pod starts).
PROBE = r"""
import json, socket, time

def attempt(target):
    kind, host, port = target["kind"], target["host"], target.get("port")
    try:
        if kind == "dns":
            found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            return "open: " + ",".join(sorted({a[4][0] for a in found}))
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(info[4])
        return "open"
    except OSError as e:
        return type(e).__name__ + ": " + str(e)

results, start = {}, time.monotonic()
if MODE == "executor":
    while attempt(TARGETS[0]) == "open" and time.monotonic() - start < 20:
        time.sleep(0.25)
    results["isolated after s"] = round(time.monotonic() - start, 2)
    for t in TARGETS:
        results[t["name"]] = attempt(t)
else:
    for t in TARGETS:
        deadline = time.monotonic() + 20
        while not (found := attempt(t)).startswith("open") and time.monotonic() < deadline:
            time.sleep(1)
        results[t["name"]] = found
try:
    results["pod ipv6 addresses"] = open("/proc/net/if_inet6").read().strip()
except OSError as e:
    results["pod ipv6 addresses"] = str(e)
print("RESULTS " + json.dumps(results), flush=True)
"""


@pytest.fixture(scope="module")
def release(cluster: Cluster, request) -> Iterator[Release]:
    cluster.require_image(SERVICE_IMAGE)
    rel = Release()
    values = rel.values(**{"jupyterhub.namespace": rel.executions, "executions.warmPods": 0})
    with installed(
        cluster, request, rel, "-f", str(EXAMPLES / "dev-cluster-values.yaml"), *values,
        "--wait", "--timeout", "180s",
    ):  # fmt: skip
        yield rel


def _get(cluster: Cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def _endpoints(cluster: Cluster, namespace: str, service: str) -> list[tuple[str, int]]:
    """The ready (address, port) pairs of ``service``'s EndpointSlices."""
    slices = _get(cluster, "-n", namespace, "get", "endpointslices",
                  "-l", f"kubernetes.io/service-name={service}")  # fmt: skip
    return sorted(
        {
            (address, port["port"])
            for s in slices["items"]
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready", True)
            for address in e["addresses"]
            for port in s.get("ports") or []
        }
    )


def _cluster_ips(cluster: Cluster, namespace: str, service: str) -> list[tuple[str, int]]:
    spec = _get(cluster, "-n", namespace, "get", "service", service)["spec"]
    return [(ip, p["port"]) for ip in spec["clusterIPs"] for p in spec["ports"]
            if p.get("protocol", "TCP") == "TCP"]  # fmt: skip


def _targets(cluster: Cluster, rel: Release) -> list[dict]:
    """What an executor must not reach, read from the cluster. The API server's endpoint
    comes first (the executor waits for it to be refused before it probes the rest)."""
    api = _endpoints(cluster, "default", "kubernetes")
    assert api, "the kubernetes service has no endpoint"
    service = _endpoints(cluster, rel.namespace, rel.name)
    assert service, f"the crucible service in {rel.namespace} has no ready endpoint"
    node = _get(cluster, "get", "nodes")["items"][0]
    node_ips = [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"]
    named = [
        *(("api-server endpoint", a, p) for a, p in api),
        *(("api-server clusterIP", a, p) for a, p in _cluster_ips(cluster, "default", "kubernetes")),
        *(("kubelet", a, 10250) for a in node_ips),
        *(("crucible clusterIP", a, p) for a, p in _cluster_ips(cluster, rel.namespace, rel.name)),
        *(("crucible endpoint", a, p) for a, p in service),
        *(("coredns clusterIP", a, p) for a, p in _cluster_ips(cluster, "kube-system", "kube-dns")),
    ]  # fmt: skip
    targets = [
        {"name": f"{what} {f'[{a}]' if ':' in a else a}:{p}", "kind": "tcp", "host": a, "port": p}
        for what, a, p in named
    ]
    targets.append({"name": "coredns lookup", "kind": "dns",
                    "host": "kubernetes.default.svc.cluster.local."})  # fmt: skip
    return targets


def _probe(targets: list[dict], mode: str) -> str:
    return f"TARGETS = {targets!r}\nMODE = {mode!r}\n" + PROBE


def _executor_pod(cluster: Cluster, rel: Release, code: str) -> tuple[dict, dict]:
    """The ConfigMap and pod of an execution of ``code``, as the backend builds them with
    the settings the chart rendered for the service; the pod also carries the hub's labels."""
    rendered = json.loads(
        _get(cluster, "-n", rel.namespace, "get", "configmap", rel.name)["data"][
            "crucible_config.json"
        ]
    )
    settings = {**rendered["CrucibleKubernetesBackend"], "isolation_probe": "off"}
    backend = CrucibleKubernetesBackend(config=Config({"CrucibleKubernetesBackend": settings}))
    labels = objects.labels("isolation", "alice", backend.dispatcher_id)
    cell = Resources(
        rendered["CrucibleDispatcher"]["default_cpu"],
        rendered["CrucibleDispatcher"]["default_memory"],
    )
    job = backend.make_job(NAME, labels, backend.image_for(None), cell, 120, {})
    template = job["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": NAME, "labels": {**template["metadata"]["labels"], **HUB_LABELS}},
        "spec": template["spec"],
    }
    configmap = objects.make_configmap(NAME, code, RUNNER.read_text(), labels)
    return configmap, pod


def _control_pod(code: str) -> dict:
    """A pod that passes Pod Security `restricted` and that no policy selects."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "isolation-control", "labels": CONTROL_LABELS},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65534,
                "runAsGroup": 65534,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "probe",
                    "image": EXECUTOR_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-I", "-c", code],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def _finished(cluster: Cluster, namespace: str, pod: str, seconds: float = 150) -> str:
    """Wait (bounded) for ``pod`` to end; its phase."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        phase = cluster.kubectl("-n", namespace, "get", "pod", pod,
                                "-o", "jsonpath={.status.phase}").stdout  # fmt: skip
        if phase in ("Succeeded", "Failed"):
            return phase
        time.sleep(2)
    return "still running"


def _results(text: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line.split(" ", 1)[1])
    return None


def test_executor_reaches_nothing_a_control_beside_it_reaches_all(cluster, release):
    """Every target refuses the executor and answers the control (the whole table is
    printed, and shown on failure); the namespace's policies select the executor and not
    the control, so the policies, enforced, make the difference."""
    rel = release
    targets = _targets(cluster, rel)
    configmap, executor = _executor_pod(cluster, rel, _probe(targets, "executor"))
    control = _control_pod(_probe(targets, "control"))
    for manifest in (configmap, executor, control):
        cluster.kubectl("-n", rel.executions, "create", "-f", "-", input=json.dumps(manifest))
    pods = {"executor": NAME, "control": "isolation-control"}
    phases = {role: _finished(cluster, rel.executions, pod) for role, pod in pods.items()}
    logs = {
        role: cluster.kubectl("-n", rel.executions, "logs", pod, check=False).stdout
        for role, pod in pods.items()
    }
    found = {
        "executor": probes.find_json(logs["executor"], "RESULTS"),
        "control": _results(logs["control"]),
    }
    if None in found.values() or "still running" in phases.values():
        events = cluster.kubectl("-n", rel.executions, "get", "events", check=False).stdout
        described = cluster.kubectl("-n", rel.executions, "describe", "pods", check=False).stdout
        pytest.fail(f"a probe pod gave no results: {phases}\n{logs}\n{events}\n{described}")
    report = json.dumps(found, indent=1)
    print(report)
    names = [t["name"] for t in targets]
    unreached = [n for n in names if not found["control"][n].startswith("open")]
    assert not unreached, f"the control pod did not reach {unreached}:\n{report}"
    reached = [n for n in names if found["executor"][n].startswith("open")]
    assert not reached, f"the executor pod reached {reached}:\n{report}"

    policies = _get(cluster, "-n", rel.executions, "get", "networkpolicies")["items"]
    selecting = {
        role: [p["metadata"]["name"] for p in policies
               if selector_matches(p["spec"]["podSelector"], pod["metadata"]["labels"])]
        for role, pod in (("executor", executor), ("control", control))
    }  # fmt: skip
    assert selecting == {"executor": [objects.POLICY_NAME], "control": []}
