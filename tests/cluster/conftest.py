"""Fixtures for tests against the dev/CI Kubernetes cluster (dev/cluster/).

The kubeconfig is taken from $CRUCIBLE_CLUSTER_KUBECONFIG, else from
`dev/cluster/cluster kubeconfig`. When the cluster is not up the tests are
skipped, unless CRUCIBLE_CLUSTER_REQUIRED=1 (set by dev/cluster/ci.sh), in
which case they fail.

On a test failure the namespace's events (streamed with `kubectl get events
--watch` while the test ran) and every pod's logs are printed into the test
output.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "dev" / "cluster" / "cluster"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cluster: needs the dev Kubernetes cluster (dev/cluster/cluster up)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _cluster_cmd(*args: str) -> str:
    return subprocess.run(
        [str(CLUSTER), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


class Kube:
    """Thin kubectl wrapper bound to the dev cluster's kubeconfig."""

    def __init__(self, kubeconfig: str, kubectl: str):
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl

    def env(self) -> dict:
        return {**os.environ, "KUBECONFIG": self.kubeconfig}

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [self.kubectl, *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
            )
        return p

    def apply(self, manifest: dict | str, namespace: str | None = None) -> None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        args = ["apply", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        self.run(*args, input=text)

    def get_json(self, *args: str) -> dict:
        return json.loads(self.run("get", "-o", "json", *args).stdout)

    def wait_for(self, predicate, timeout: float, interval: float = 0.5, what: str = ""):
        deadline = time.monotonic() + timeout
        last = None
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


def _api_answers(kubeconfig: str, kubectl: str) -> bool:
    if not (os.path.exists(kubeconfig) and os.path.exists(kubectl)):
        return False
    p = subprocess.run(
        [kubectl, "--kubeconfig", kubeconfig, "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return p.returncode == 0


@pytest.fixture(scope="session")
def kube() -> Kube:
    kubeconfig = os.environ.get("CRUCIBLE_CLUSTER_KUBECONFIG") or _cluster_cmd("kubeconfig")
    kubectl = os.environ.get("CRUCIBLE_CLUSTER_KUBECTL") or str(
        Path(_cluster_cmd("bin-dir")) / "kubectl"
    )
    if not _api_answers(kubeconfig, kubectl):
        msg = f"dev cluster not up (kubeconfig {kubeconfig}); run dev/cluster/cluster up"
        if os.environ.get("CRUCIBLE_CLUSTER_REQUIRED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return Kube(kubeconfig, kubectl)


@pytest.fixture(scope="session")
def images() -> dict:
    env = {}
    for line in (REPO / "dev" / "cluster" / "versions.env").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip().strip('"')
    return {"executor": env["EXECUTOR_IMAGE"], "ml": env["EXECUTOR_ML_IMAGE"]}


def _dump_namespace(kube: Kube, ns: str, events_file: str) -> str:
    out = [f"===== events in namespace {ns} (streamed) ====="]
    try:
        out.append(Path(events_file).read_text())
    except OSError as e:
        out.append(f"(no events: {e})")
    p = kube.run("get", "pods", "-n", ns, "-o", "wide", check=False)
    out.append(f"===== pods in {ns} =====\n{p.stdout}{p.stderr}")
    try:
        pods = kube.get_json("pods", "-n", ns)["items"]
    except Exception as e:
        pods = []
        out.append(f"(cannot list pods: {e})")
    for pod in pods:
        name = pod["metadata"]["name"]
        out.append(f"===== pod {name} status =====\n{json.dumps(pod.get('status', {}), indent=1)}")
        for c in pod["spec"].get("containers", []):
            lp = kube.run("logs", "-n", ns, name, "-c", c["name"], check=False)
            out.append(f"===== logs {name}/{c['name']} =====\n{lp.stdout}{lp.stderr}")
    p = kube.run("get", "events", "-A", "--sort-by=.lastTimestamp", check=False)
    out.append(f"===== all cluster events =====\n{p.stdout[-20000:]}")
    return "\n".join(out)


@pytest.fixture
def namespace(kube: Kube, request):
    """A fresh namespace; its events are streamed while the test runs and
    printed, with all pod logs, if the test fails."""
    ns = "t-" + uuid.uuid4().hex[:10]
    kube.run("create", "namespace", ns)
    # Pods in a new namespace need its default ServiceAccount.
    kube.wait_for(
        lambda: kube.run("get", "serviceaccount", "default", "-n", ns, check=False).returncode == 0,
        60,
        what="default serviceaccount",
    )
    events = tempfile.NamedTemporaryFile(prefix=f"events-{ns}-", suffix=".log", delete=False)
    watcher = subprocess.Popen(
        [
            kube.kubectl,
            "get",
            "events",
            "-n",
            ns,
            "--watch",
            "-o",
            "custom-columns=TIME:.lastTimestamp,TYPE:.type,REASON:.reason,"
            "OBJECT:.involvedObject.name,MESSAGE:.message",
        ],
        stdout=events,
        stderr=subprocess.STDOUT,
        env=kube.env(),
    )
    try:
        yield ns
    finally:
        watcher.terminate()
        try:
            watcher.wait(5)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()
        events.close()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(_dump_namespace(kube, ns, events.name))
        os.unlink(events.name)
        kube.run("delete", "namespace", ns, "--wait=false", check=False)
