"""Fixtures for tests against the dev/CI Kubernetes cluster (dev/cluster/).

The cluster itself is the root conftest's ``kube`` (tests.helpers.cluster: the kubeconfig
from $CRUCIBLE_CLUSTER_KUBECONFIG, else `dev/cluster/cluster kubeconfig`; skipped with the
reason when the cluster is not up, failed instead under CRUCIBLE_CLUSTER_REQUIRED=1).

On a test failure the namespace's events (streamed with `kubectl get events
--watch` while the test ran) and every pod's logs are printed into the test
output.
"""

from __future__ import annotations

import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cluster import Kube, namespace_report, versions
from tests.helpers.reports import failed


@pytest.fixture(scope="session")
def images() -> dict:
    """The executor images' names (dev/cluster/versions.env): ``executor`` and ``ml``."""
    env = versions()
    return {"executor": env["EXECUTOR_IMAGE"], "ml": env["EXECUTOR_ML_IMAGE"]}


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
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
    with tempfile.NamedTemporaryFile(prefix=f"events-{ns}-", suffix=".log") as events:
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
            if failed(request.node):
                streamed = Path(events.name).read_text(errors="replace")
                everywhere = kube.run(
                    "get", "events", "-A", "--sort-by=.lastTimestamp", check=False
                )
                print(namespace_report(kube, ns, streamed))
                print(f"===== all cluster events =====\n{everywhere.stdout[-20000:]}")
        kube.run("delete", "namespace", ns, "--wait=false", check=False)
