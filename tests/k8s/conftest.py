"""Fixtures for the Kubernetes backend tests, on the real dev cluster (dev/cluster).

Each test module gets its own namespace. When a test fails, the namespace's events and
every pod's log are printed into the test output. Without a running cluster the tests
skip with that reason, unless CRUCIBLE_CLUSTER_REQUIRED=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "dev" / "cluster" / "cluster"


def _cluster(*args: str) -> str:
    return subprocess.run(
        [str(CLUSTER), *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


@pytest.fixture(scope="session")
def kube() -> dict:
    """``{"kubeconfig", "kubectl"}`` of the running dev cluster."""
    try:
        kubeconfig = os.environ.get("CRUCIBLE_CLUSTER_KUBECONFIG") or _cluster("kubeconfig")
        kubectl = str(Path(_cluster("bin-dir")) / "kubectl")
        subprocess.run(
            [kubectl, "--kubeconfig", kubeconfig, "get", "--raw", "/readyz"],
            check=True,
            capture_output=True,
            timeout=20,
        )
    except (subprocess.SubprocessError, OSError) as e:
        if os.environ.get("CRUCIBLE_CLUSTER_REQUIRED") == "1":
            pytest.fail(f"the dev cluster is required but not reachable: {e}")
        pytest.skip(f"the dev cluster is not running (start it: dev/cluster/cluster up): {e}")
    return {"kubeconfig": kubeconfig, "kubectl": kubectl}


def kubectl(kube: dict, *args: str, input: str | None = None, check: bool = True) -> str:
    """Run kubectl against the dev cluster; its stdout."""
    done = subprocess.run(
        [kube["kubectl"], "--kubeconfig", kube["kubeconfig"], *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and done.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def namespace(kube) -> str:
    """A fresh namespace for this module, deleted afterwards."""
    name = f"crucible-test-{uuid.uuid4().hex[:8]}"
    kubectl(kube, "create", "namespace", name)
    yield name
    kubectl(kube, "delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "namespace" in item.funcargs:
        kube, ns = item.funcargs.get("kube"), item.funcargs["namespace"]
        if kube:
            text = kubectl(kube, "-n", ns, "get", "events", "--sort-by=.lastTimestamp", check=False)
            pods = json.loads(
                kubectl(kube, "-n", ns, "get", "pods", "-o", "json", check=False) or "{}"
            )
            for pod in pods.get("items", []):
                name = pod["metadata"]["name"]
                text += f"\n--- log of {name} ---\n"
                text += kubectl(kube, "-n", ns, "logs", name, "--all-containers", check=False)
            report.sections.append(("cluster events and pod logs", text))


@pytest.fixture
def k8s(kube, namespace, make_dispatcher):
    """Start dispatchers on the Kubernetes backend in the module's namespace
    (keywords: ``CrucibleKubernetesBackend`` traits; ``dispatcher={...}`` for the rest).
    Without warm pods unless ``warm_pods`` is given: every cell takes the Job path."""

    async def make(db_url: str | None = None, dispatcher: dict | None = None, **backend):
        backend = {"namespace": namespace, "kubeconfig": kube["kubeconfig"], "warm_pods": 0,
                   **backend}  # fmt: skip
        return await make_dispatcher(
            db_url,
            kubernetes=backend,
            **{"backend": "kubernetes", "max_concurrency": 50, **(dispatcher or {})},
        )

    return make
