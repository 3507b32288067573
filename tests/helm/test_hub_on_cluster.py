"""crucible beside a JupyterHub on the dev cluster, end to end, as its users meet it.

Honest scope: the zero-to-jupyterhub chart cannot be pulled here (no network; it is on
none of the package registries we reach), so the hub is deployed by a chart of our own,
``tests/helm/minihub``, that mirrors z2jh's settings: a hub pod (``component: hub``)
running KubeSpawner, configurable-http-proxy in a pod of its own (``component: proxy``),
z2jh's Services (``hub:8081``, ``proxy-api``, ``proxy-public``), z2jh's singleuser
NetworkPolicy, user pods labelled ``component: singleuser-server`` / ``release:
jupyterhub`` and holding no service-account token, and the dummy authenticator with a
password. It reads ``helm/crucible/examples/z2jh-values.yaml`` unchanged and applies it
the way z2jh's own ``jupyterhub_config.py`` does (``hub.services``, ``hub.loadRoles``,
``hub.config``, ``hub.extraEnv``, ``singleuser.extraEnv``, ``hub.extraConfig``).
``hub.networkPolicy`` is not rendered (the stand-in has no hub policy). Both releases go
into the namespace ``jhub`` that the example names; the crucible chart gets the dev
cluster's example values.

Then, through the proxy (a ``kubectl port-forward`` to ``proxy-public`` on 127.0.0.1):
alice and bob log in with a password (cookies) and start their servers (real pods from
``localhost/crucible/singleuser:dev``); a ``%%crucible --backend kubernetes`` cell in
alice's kernel streams its output, runs as a Job in the executions namespace and is
recorded as alice; bob gets 404 for it and does not list it; the admin sees both. A
user pod holds no service-account token and cannot connect to an executor pod (the
crucible pod is the control it can connect to). The crucible pod deleted mid-cell: the
new one reattaches, the cell completes or ends with a reason, no output line is lost.

Needs the images of ``dev/cluster/cluster images``; skips saying so without them. Run
holding the shared cluster's lock:
``flock /tmp/crucible-k8s.lock .venv/bin/python -m pytest tests/helm/test_hub_on_cluster.py``.
On failure the namespaces' objects and events and the hub's, proxy's, crucible's and user
pods' logs are printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from crucible_jupyter.backends.kubernetes import objects
from tests.helpers.hub import Hub, Kernel, UserServer, text_of

from .chart import CHART, EXAMPLES
from .cluster import Cluster

pytestmark = [pytest.mark.k8s]
try:  # install, two user pods and a restart of the service: more than the per-test limit
    import pytest_timeout  # noqa: F401

    pytestmark.append(pytest.mark.timeout(900))
except ImportError:  # no per-test limit without the plugin
    pass

MINIHUB = Path(__file__).with_name("minihub")
NAMESPACE = "jhub"  # the example values' namespace (the service URL names it)
EXECUTIONS = "jhub-executions"
IMAGES = (
    "localhost/crucible/service:dev",
    "localhost/crucible/singleuser:dev",
    "localhost/crucible/hub:dev",
)
PASSWORD = secrets.token_urlsafe(12)
GUARD = 300  # seconds a polling loop may wait before the test fails (not a timing check)


def _wait(what: str, probe, seconds: float = GUARD) -> object:
    """Poll ``probe()`` until it returns something true (bounded)."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            found = probe()
        except (requests.RequestException, AssertionError) as e:
            found, last = None, e
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"{what}: not within {seconds:g} s (last: {last})")


class PortForward:
    """``kubectl port-forward`` of ``target`` to a free port on 127.0.0.1 (stopped by
    :meth:`stop`)."""

    def __init__(self, cluster: Cluster, target: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [cluster.kubectl_path, "--kubeconfig", cluster.kubeconfig, "-n", NAMESPACE,
             "port-forward", "--address", "127.0.0.1", target, f":{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert found, f"kubectl port-forward {target}: {line}"
        self.url = f"http://127.0.0.1:{found.group(1)}"

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict]:
    out = cluster.kubectl(
        "-n", namespace, "get", "pods", "-l", selector, "-o", "json", check=False
    ).stdout  # fmt: skip
    return json.loads(out or '{"items": []}')["items"]


def _ready(pod: dict) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


def _dump(cluster: Cluster) -> None:
    for ns in (NAMESPACE, EXECUTIONS):
        print(cluster.kubectl("-n", ns, "get", "all,networkpolicies,events", check=False).stdout)
    for selector in ("component=hub", "component=proxy", "app.kubernetes.io/component=service",
                     "component=singleuser-server"):  # fmt: skip
        for pod in _pods(cluster, NAMESPACE, selector):
            name = pod["metadata"]["name"]
            log = cluster.kubectl("-n", NAMESPACE, "logs", name, "--tail=80", check=False)
            print(f"--- {name}\n{log.stdout}{log.stderr}")


def _delete_namespaces(cluster: Cluster, wait: bool) -> None:
    for ns in (EXECUTIONS, NAMESPACE):
        cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", f"--wait={str(wait).lower()}",
                        check=False)  # fmt: skip


class Deployment:
    """Both releases installed, the proxy forwarded; users' sessions and tokens."""

    def __init__(self, cluster: Cluster, proxy: PortForward) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.sessions: dict[str, requests.Session] = {}
        self.hub = Hub(url=proxy.url, api_url=f"{proxy.url}/hub/api", service_url="")

    def log_in(self, user: str) -> requests.Session:
        """Log ``user`` in through the proxy with the login form, as a browser does; make
        an API token with the resulting cookie (for the REST and kernel calls)."""
        s = requests.Session()
        r = s.get(f"{self.proxy.url}/hub/login", timeout=60)
        assert r.status_code == 200, r.text[:2000]
        xsrf = s.cookies.get("_xsrf", path="/hub/")
        r = s.post(
            f"{self.proxy.url}/hub/login",
            data={"username": user, "password": PASSWORD, "_xsrf": xsrf},
            allow_redirects=False,
            timeout=60,
        )
        assert r.status_code == 302, (r.status_code, r.text[:2000])
        assert "jupyterhub-hub-login" in s.cookies, s.cookies
        xsrf = s.cookies.get("_xsrf", path="/hub/")  # a new one, bound to the new session
        r = s.post(
            f"{self.hub.api_url}/users/{user}/tokens",
            json={"note": "tests/helm/test_hub_on_cluster"},
            headers={"X-XSRFToken": xsrf, "Referer": f"{self.proxy.url}/hub/"},
            timeout=60,
        )
        assert r.status_code == 201, (r.status_code, r.text[:2000])
        self.hub.tokens[user] = r.json()["token"]
        self.sessions[user] = s
        return s

    def start_server(self, user: str) -> UserServer:
        """Start ``user``'s server (a pod made by KubeSpawner) and wait until it answers."""
        r = requests.post(
            f"{self.hub.api_url}/users/{user}/server", headers=self.hub.headers(user), timeout=60
        )
        assert r.status_code in (201, 202, 400), (r.status_code, r.text)  # 400: already
        server = UserServer(self.hub, user)

        def up() -> bool:
            r = requests.get(
                f"{server.base}api/status", headers=self.hub.headers(user),
                allow_redirects=False, timeout=30,
            )  # fmt: skip
            return r.status_code == 200

        _wait(f"{user}'s server", up)
        return server

    def crucible_pod(self) -> dict | None:
        """The crucible pod that is ready (its name stays ``crucible-0`` across restarts:
        tell one from the next by ``metadata.uid``)."""
        pods = [p for p in _pods(self.cluster, NAMESPACE, "app.kubernetes.io/component=service")
                if _ready(p)]  # fmt: skip
        return pods[0] if pods else None

    def admin_call(self, method: str, path: str) -> tuple[int, object]:
        """The admin's token at the crucible service itself (a port-forward to its pod)."""
        forward = PortForward(self.cluster, "svc/crucible", 8576)
        try:
            self.hub.service_url = f"{forward.url}/services/crucible/"
            return self.hub.call("admin", method, path)
        finally:
            forward.stop()


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, request) -> Iterator[Deployment]:
    node = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"][0]
    names = {n for image in node["status"].get("images", []) for n in image.get("names") or []}
    missing = [i for i in IMAGES if i not in names]
    if missing:
        reason = f"{missing} not loaded on the node (dev/cluster/cluster images builds them)"
        if os.environ.get("CRUCIBLE_CLUSTER_REQUIRED") == "1":
            pytest.fail(reason)  # dev/test builds them: missing is a failure there
        pytest.skip(reason)
    _delete_namespaces(cluster, wait=True)  # a run killed before its clean-up
    started = time.monotonic()
    proxy = None
    try:
        cluster.helm(
            "install", "crucible", str(CHART), "--namespace", NAMESPACE, "--create-namespace",
            "-f", str(EXAMPLES / "dev-cluster-values.yaml"),
            "--set", f"executions.namespace={EXECUTIONS}",
        )  # fmt: skip
        cluster.helm(
            "install", "jupyterhub", str(MINIHUB), "--namespace", NAMESPACE,
            "-f", str(EXAMPLES / "z2jh-values.yaml"), "--set", f"hub.dummyPassword={PASSWORD}",
        )  # fmt: skip
        for selector in ("component=hub", "component=proxy"):
            _wait(f"a ready pod {selector}",
                  lambda s=selector: any(_ready(p) for p in _pods(cluster, NAMESPACE, s)))  # fmt: skip
        proxy = PortForward(cluster, "svc/proxy-public", 80)
        d = Deployment(cluster, proxy)
        _wait("the crucible pod ready", d.crucible_pod)
        print(f"installed in {time.monotonic() - started:.0f} s")
    except BaseException:
        _dump(cluster)
        _tear_down(cluster, proxy)
        raise
    try:
        yield d
    finally:
        if request.session.testsfailed:
            _dump(cluster)
        _tear_down(cluster, proxy)
        print(f"module wall time {time.monotonic() - started:.0f} s")


def _tear_down(cluster: Cluster, proxy: PortForward | None) -> None:
    if proxy is not None:
        proxy.stop()
    cluster.helm("uninstall", "jupyterhub", "--namespace", NAMESPACE, "--wait", check=False)
    cluster.helm("uninstall", "crucible", "--namespace", NAMESPACE, "--wait", check=False)
    _delete_namespaces(cluster, wait=False)


@pytest.fixture(scope="module")
def servers(deployed: Deployment) -> dict[str, UserServer]:
    for user in ("alice", "bob", "admin"):
        deployed.log_in(user)
    return {user: deployed.start_server(user) for user in ("alice", "bob")}


def _marker() -> str:
    return f"h9-{uuid.uuid4().hex[:8]}"


def _find(server: UserServer, name: str) -> dict | None:
    code, body, _ = server.call("GET", "executions")
    assert code == 200, body
    return next((e for e in body["executions"] if e.get("name") == name), None)


async def test_alices_cell_streams_runs_as_a_job_and_is_hers(deployed, servers):
    alice, bob = servers["alice"], servers["bob"]
    name = _marker()
    cell = (
        f"%%crucible --backend kubernetes --name {name}\n"
        "import time\n"
        "for i in range(3):\n"
        "    print('line', i, flush=True)\n"
        "    time.sleep(1)\n"
    )
    async with Kernel(alice, "python3") as kernel:
        reply, _ = await kernel.run("%load_ext crucible_jupyter")
        assert reply["status"] == "ok", reply
        msg_id = kernel.execute(cell)
        first = await kernel.message(msg_id)  # streamed: output arrives before the reply
        outputs: list[dict] = [first]
        reply, outputs = await kernel.finish(msg_id, outputs)
    text = text_of(outputs)
    assert reply["status"] == "ok", (reply, text)
    for i in range(3):
        assert f"line {i}" in text, text
    streams = [m for m in outputs if m["msg_type"] == "stream"]
    assert streams, text

    execution = _find(alice, name)
    assert execution is not None
    assert execution["user"] == "alice", execution
    assert execution["status"] == "succeeded", execution

    # a Job in the executions namespace, labelled with the execution and its user
    jobs = json.loads(
        deployed.cluster.kubectl(
            "-n", EXECUTIONS, "get", "jobs",
            "-l", f"{objects.EXECUTION_LABEL}={objects.label_value(execution['id'])}",
            "-o", "json",
        ).stdout
    )["items"]  # fmt: skip
    claimed = _pods(
        deployed.cluster,
        EXECUTIONS,
        f"{objects.EXECUTION_LABEL}={objects.label_value(execution['id'])}",
    )
    assert jobs or claimed, f"no Job or pod of {execution['id']} in {EXECUTIONS}"
    for obj in jobs + claimed:
        assert obj["metadata"]["labels"][objects.USER_LABEL] == "alice", obj["metadata"]

    # bob cannot see it; the admin sees both users' executions
    code, body, _ = bob.call("GET", f"executions/{execution['id']}")
    assert code == 404, body
    code, bobs, _ = bob.call("POST", "executions", json={"code": "print('bob')"})
    assert code == 201, bobs
    assert _find(bob, name) is None
    code, everyone = deployed.admin_call("GET", "executions?limit=200")
    assert code == 200, everyone
    owners = {e["id"]: e["user"] for e in everyone["executions"]}  # type: ignore[index]
    assert owners.get(execution["id"]) == "alice", owners
    assert owners.get(bobs["id"]) == "bob", owners


PROBE = """
import json, os, socket
def connect(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "connected"
    except OSError as e:
        return type(e).__name__
print("PROBE " + json.dumps({
    "secrets": os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"),
    "token_env": "KUBERNETES_SERVICE_HOST" in os.environ and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"),
    "executor": connect(EXECUTOR_IP, 8888),
    "crucible": connect(CRUCIBLE_IP, 8576),
}))
"""


async def test_user_pod_has_no_token_and_cannot_reach_executors(deployed, servers):
    cluster = deployed.cluster
    (pod,) = [p for p in _pods(cluster, NAMESPACE, "component=singleuser-server")
              if p["metadata"]["annotations"].get("hub.jupyter.org/username") == "alice"]  # fmt: skip
    assert pod["spec"].get("automountServiceAccountToken") is False, pod["spec"]
    assert not any(
        m["mountPath"].startswith("/var/run/secrets")
        for c in pod["spec"]["containers"]
        for m in c.get("volumeMounts") or []
    ), pod["spec"]["containers"]

    def running_executor() -> dict | None:
        pods = _pods(cluster, EXECUTIONS, f"{objects.APP_LABEL}={objects.APP}")
        return next((p for p in pods if p.get("status", {}).get("podIP")), None)

    executor = _wait("a running executor pod", running_executor)
    crucible = next(p for p in _pods(cluster, NAMESPACE, "app.kubernetes.io/component=service")
                    if _ready(p))  # fmt: skip
    code = PROBE.replace("EXECUTOR_IP", repr(executor["status"]["podIP"])).replace(  # type: ignore[index]
        "CRUCIBLE_IP", repr(crucible["status"]["podIP"])
    )
    async with Kernel(servers["alice"], "python3") as kernel:
        reply, outputs = await kernel.run(code)
    text = text_of(outputs)
    assert reply["status"] == "ok", (reply, text)
    found = json.loads(text.split("PROBE ", 1)[1])
    assert found["secrets"] is False, found
    assert found["token_env"] is False, found
    assert found["crucible"] == "connected", found  # the control: the probe can connect
    assert found["executor"] != "connected", found


def _overlap(deployed: Deployment, first: str) -> list[str]:
    """Until the pod of uid ``first`` is gone (bounded): the other crucible pods seen
    while it still existed, in any phase (a second dispatcher beside the one in its
    grace period). Told apart by uid: a StatefulSet's new pod has the old one's name."""
    seen: set[str] = set()
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        pods = _pods(deployed.cluster, NAMESPACE, "app.kubernetes.io/component=service")
        if first not in {p["metadata"]["uid"] for p in pods}:
            break
        seen |= {
            f"{p['metadata']['name']} ({p['metadata']['uid']}, {p.get('status', {}).get('phase')})"
            for p in pods
            if p["metadata"]["uid"] != first
        }
        time.sleep(1)
    else:
        pytest.fail(f"the deleted crucible pod {first} still exists after {GUARD} s")
    return sorted(seen)


async def test_crucible_pod_deleted_mid_cell(deployed, servers):
    """The crucible pod deleted mid-cell: one dispatcher at a time; the new one reattaches;
    the cell completes or ends with a reason; the notebook shows what is recorded, each
    line once, nothing lost.

    This failed while the chart ran the service as a Deployment (with Recreate, which
    only governs rollouts): the replacement started at once, beside the old pod in its
    25 s shutdown grace, on the same SQLite file; both wrote the cell's events (UNIQUE
    constraint failed: events.execution_id, events.seq) and the notebook was told
    'failed' while the record stayed running. The chart's StatefulSet starts the
    replacement only once the old pod is gone."""
    alice = servers["alice"]
    name = _marker()
    lines = 40
    cell = (
        f"%%crucible --backend kubernetes --name {name} --timeout 300\n"
        "import time\n"
        f"for i in range({lines}):\n"
        "    print('tick', i, flush=True)\n"
        "    time.sleep(1)\n"
    )
    pod = deployed.crucible_pod()
    assert pod
    first = pod["metadata"]["uid"]
    async with Kernel(alice, "python3") as kernel:
        reply, _ = await kernel.run("%load_ext crucible_jupyter")
        assert reply["status"] == "ok", reply
        msg_id = kernel.execute(cell)
        outputs: list[dict] = []
        while "tick 2" not in text_of(outputs):
            outputs.append(await kernel.message(msg_id))
        deployed.cluster.kubectl(
            "-n", NAMESPACE, "delete", "pod", pod["metadata"]["name"], "--wait=false"
        )  # fmt: skip
        overlap = asyncio.create_task(asyncio.to_thread(_overlap, deployed, first))
        reply, outputs = await kernel.finish(msg_id, outputs)
        beside = await overlap
    text = text_of(outputs)
    _wait(
        "a new crucible pod ready",
        lambda: (new := deployed.crucible_pod()) and new["metadata"]["uid"] != first and new,
    )
    execution = _find(alice, name)
    assert execution is not None, text

    def terminal() -> dict | None:
        code, record, _ = alice.call("GET", f"executions/{execution['id']}")
        assert code == 200, record
        return (
            record
            if record["status"] in ("succeeded", "failed", "timed_out", "cancelled")
            else None
        )

    record = _wait("the cell's record terminal", terminal)
    assert isinstance(record, dict)
    print(f"outcome: {record['status']} ({record['reason']}); notebook reply {reply['status']}")
    assert not beside, f"crucible pods running beside {first} in its grace period: {beside}"
    recorded = "".join(e.get("text", "") for e in record["events"])
    if record["status"] == "succeeded":
        assert reply["status"] == "ok", (reply, text)
        assert all(f"tick {i}\n" in recorded for i in range(lines)), recorded
    else:  # ended with a reason, and what ran before the end is kept
        assert reply["status"] == "error", (reply, text)
        assert record["reason"], record
        assert "tick 0\n" in recorded, recorded
    # the notebook shows each line once, in order, and only lines the record holds
    shown = [int(n) for n in re.findall(r"tick (\d+)", text)]
    assert shown == sorted(set(shown)), shown
    assert all(f"tick {i}\n" in recorded for i in shown), (shown, recorded)


def _hub_token(deployed: Deployment) -> str:
    secrets_ = json.loads(
        deployed.cluster.kubectl("-n", NAMESPACE, "get", "secrets", "-o", "json").stdout
    )["items"]
    (secret,) = [s for s in secrets_ if s["metadata"]["name"].endswith("-hub-token")]
    return json.dumps(secret["data"], sort_keys=True)


def test_helm_upgrade_keeps_the_token_and_the_executions(deployed, servers):
    """`helm upgrade` with a changed value rolls the crucible pod (the config checksum
    changes): the hub token and alice's recorded executions are there after it."""
    alice = servers["alice"]
    name = _marker()
    code, created, _ = alice.call("POST", "executions", json={"code": "print(7)", "name": name})
    assert code == 201, created
    _wait("alice's cell finished", lambda: (e := _find(alice, name)) and e["status"] == "succeeded")
    token = _hub_token(deployed)
    pod = deployed.crucible_pod()
    assert pod
    deployed.cluster.helm(
        "upgrade", "crucible", str(CHART), "--namespace", NAMESPACE, "--reuse-values",
        "--set", "executions.maxConcurrentPerUser=5",
    )  # fmt: skip
    _wait(
        "the upgraded crucible pod ready",
        lambda: (
            (new := deployed.crucible_pod()) and new["metadata"]["uid"] != pod["metadata"]["uid"]
        ),
    )
    assert _hub_token(deployed) == token
    after = _wait("alice's execution listed after the upgrade", lambda: _find(alice, name))
    assert isinstance(after, dict)
    assert after["id"] == created["id"]
    assert after["status"] == "succeeded", after
