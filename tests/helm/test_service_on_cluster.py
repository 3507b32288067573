"""The chart's `crucible serve` running on the dev cluster, with its Role only.

Needs the service image (``localhost/crucible/service:dev``, built and loaded by
``dev/cluster/cluster images``); without it these tests skip saying so. Installed with
the dev cluster's example values: the pod becomes ready (its dispatcher started with
nothing but the namespaced Role, its SQLite database on the claim, a read-only root),
keeps a warm executor pod in the executions namespace (Pod Security `restricted`, the
deny-all policy selecting it), comes back ready when deleted, admits connections only
from pods labelled as z2jh's hub and user servers (real connections; an unlabelled pod
is the control that proves the policy is enforced), and ``helm uninstall`` leaves no
executor Job or pod. On failure the namespaces' events and the service's log
are printed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from crucible_jupyter.backends.kubernetes import objects

from .chart import EXAMPLES, selector_matches
from .cluster import Cluster, Release, installed

pytestmark = pytest.mark.k8s

IMAGE = "localhost/crucible/service:dev"


@pytest.fixture(scope="module")
def service_release(cluster: Cluster, request) -> Iterator[Release]:
    cluster.require_image(IMAGE)
    rel = Release()
    with installed(
        cluster, request, rel, "-f", str(EXAMPLES / "dev-cluster-values.yaml"), *rel.values(),
        "--wait", "--timeout", "180s", check=False,
    ):  # fmt: skip
        yield rel


def _wait(what: str, probe, seconds: float = 180) -> object:
    """Poll ``probe()`` until it returns something true (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(2)
    pytest.fail(f"{what}: not within {seconds:g} s")


def _service_pods(cluster: Cluster, rel: Release) -> list[dict]:
    out = cluster.kubectl(
        "-n", rel.namespace, "get", "pods", "-l", "app.kubernetes.io/component=service",
        "-o", "json", check=False,
    ).stdout  # fmt: skip
    return json.loads(out or '{"items": []}')["items"]


def _ready(cluster: Cluster, rel: Release) -> dict | None:
    """The service's ready pod (not terminating), if any."""
    for pod in _service_pods(cluster, rel):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        conditions = pod.get("status", {}).get("conditions") or []
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return pod
    return None


def _ready_pod(cluster: Cluster, rel: Release) -> str | None:
    pod = _ready(cluster, rel)
    return pod["metadata"]["name"] if pod else None


def _executor_pods(cluster: Cluster, rel: Release) -> list[dict]:
    out = cluster.kubectl(
        "-n", rel.executions, "get", "pods", "-l", f"{objects.APP_LABEL}={objects.APP}",
        "-o", "json", check=False,
    ).stdout  # fmt: skip
    return json.loads(out or '{"items": []}')["items"]


def test_service_becomes_ready(cluster, service_release):
    pod = _wait("the crucible pod ready", lambda: _ready_pod(cluster, service_release))
    log = cluster.kubectl("-n", service_release.namespace, "logs", str(pod)).stdout
    # the dev-cluster values' concurrency, and no call the Role refused
    assert "backend=kubernetes" in log, log
    assert "concurrency=8" in log, log
    assert "Forbidden" not in log, log
    assert "403" not in log, log


def test_service_keeps_a_warm_pod_the_policy_selects(cluster, service_release):
    def warm():
        return [p for p in _executor_pods(cluster, service_release)
                if p["metadata"]["labels"].get(objects.STATE_LABEL) == "warm"]  # fmt: skip

    (pod, *_) = _wait("a warm executor pod", warm)
    policy = json.loads(
        cluster.kubectl(
            "-n", service_release.executions, "get", "networkpolicy", objects.POLICY_NAME,
            "-o", "json",
        ).stdout
    )  # fmt: skip
    assert selector_matches(policy["spec"]["podSelector"], pod["metadata"]["labels"])


def test_deleted_pod_comes_back_ready_never_beside_it(cluster, service_release):
    """A deleted pod comes back (the StatefulSet's pod keeps its name, so pods are told
    apart by uid), and no other service pod runs while the deleted one still exists: at
    most one dispatcher (a Deployment started its replacement at once)."""
    rel = service_release
    first = _wait("the crucible pod ready", lambda: _ready(cluster, rel))
    assert isinstance(first, dict)
    uid = first["metadata"]["uid"]
    cluster.kubectl("-n", rel.namespace, "delete", "pod", first["metadata"]["name"],
                    "--wait=false")  # fmt: skip
    beside: set[str] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pods = _service_pods(cluster, rel)
        if uid not in {p["metadata"]["uid"] for p in pods}:
            break
        beside |= {
            f"{p['metadata']['name']} ({p['metadata']['uid']})"
            for p in pods
            if p["metadata"]["uid"] != uid
        }
        time.sleep(0.5)
    else:
        pytest.fail("the deleted crucible pod still exists after 180 s")
    assert not beside, f"service pods beside the deleted one in its grace period: {beside}"
    second = _wait(
        "a new crucible pod ready",
        lambda: (pod := _ready(cluster, rel)) and pod["metadata"]["uid"] != uid and pod,
    )
    assert isinstance(second, dict)


#: Tries for 20 s: kube-router adds a new pod's address to a policy's ipsets a moment after
#: the pod starts, so an admitted pod may be refused at first (seen once in a full run); a
#: pod that must be blocked is then shown to stay blocked for the whole time.
PROBE = """
import sys, time, urllib.request
deadline = time.monotonic() + 20
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
            print("REACHED", r.status)
            break
    except Exception as e:
        if time.monotonic() > deadline:
            print("BLOCKED", type(e).__name__, e)
            break
        time.sleep(1)
"""

#: probe pod -> (labels, whether the service's NetworkPolicy admits it)
PROBES = {
    "user-server": ({"component": "singleuser-server", "release": "jupyterhub"}, True),
    "hub": ({"component": "hub", "release": "jupyterhub"}, True),
    "other-release": ({"component": "singleuser-server", "release": "other"}, False),
    "proxy": ({"component": "proxy", "release": "jupyterhub"}, False),
    "unlabelled": ({}, False),  # the control: a pod no rule names
}


def test_network_policy_admits_only_hub_and_user_servers(cluster, service_release):
    """Real connections from pods labelled as z2jh labels its pods: the hub and user
    servers of release `jupyterhub` reach the service; another release's, the proxy and
    an unlabelled pod (the control: it proves the policy is enforced) do not."""
    rel = service_release
    _wait("the crucible pod ready", lambda: _ready_pod(cluster, rel))
    url = f"http://crucible.{rel.namespace}.svc:8576/services/crucible/healthz"
    for name, (labels, _) in PROBES.items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"probe-{name}", "labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [
                    {
                        "name": "probe",
                        "image": "localhost/crucible/executor:dev",
                        "imagePullPolicy": "Never",
                        "command": ["python3", "-c", PROBE, url],
                    }
                ],
            },
        }
        cluster.kubectl("-n", rel.namespace, "create", "-f", "-", input=json.dumps(pod))

    def finished() -> dict[str, str] | None:
        out = {}
        for name in PROBES:
            phase = cluster.kubectl(
                "-n", rel.namespace, "get", "pod", f"probe-{name}", "-o", "jsonpath={.status.phase}"
            ).stdout  # fmt: skip
            if phase not in ("Succeeded", "Failed"):
                return None
            out[name] = cluster.kubectl("-n", rel.namespace, "logs", f"probe-{name}").stdout
        return out

    results = _wait("the probe pods to finish", finished, seconds=120)
    assert isinstance(results, dict)
    for name, (_, admitted) in PROBES.items():
        expected = "REACHED 200" if admitted else "BLOCKED"
        assert expected in results[name], f"{name}: {results[name]}"


def test_zz_uninstall_leaves_no_executor(cluster, service_release):
    rel = service_release
    cluster.helm("uninstall", rel.name, "--namespace", rel.namespace, "--wait")

    def gone():
        jobs = cluster.kubectl("-n", rel.executions, "get", "jobs", "-o", "name", check=False)
        return not _executor_pods(cluster, rel) and not jobs.stdout.strip()

    _wait("no executor Job or pod after helm uninstall", gone, seconds=120)
