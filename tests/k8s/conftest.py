"""Fixtures for the Kubernetes backend tests, on the real dev cluster (dev/cluster).

Each test module gets its own namespace. When a test fails, the namespace's events and
every pod's log are printed into the test output. Without a running cluster the tests
skip with that reason, unless CRUCIBLE_CLUSTER_REQUIRED=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
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


async def wait_until_job_deleted(
    kube: dict, namespace: str, job: str, *, fully: bool = False
) -> None:
    """Wait (bounded, 10 s) until the Job whose name contains ``job`` (an execution's id,
    or a warm pod's Job name) is being deleted (``fully``: gone); the backend deletes it in
    the background once the outcome is recorded (a cancel returns before that)."""
    for _ in range(50):
        jobs = json.loads(kubectl(kube, "-n", namespace, "get", "jobs", "-o", "json"))["items"]
        if not [j for j in jobs if job in j["metadata"]["name"]
                and (fully or not j["metadata"].get("deletionTimestamp"))]:  # fmt: skip
            return
        await asyncio.sleep(0.2)
    pytest.fail(f"the Job {job} was not deleted after the execution finished")


def dispatcher_env(kube: dict, namespace: str, tmp_path: Path, warm_pods: int) -> dict:
    """Environment of a dispatcher process (``crucible run``) on this module's namespace,
    with ``warm_pods`` set through a crucible_config.json of its own."""
    config = tmp_path / "jupyter-config"
    config.mkdir(exist_ok=True)
    settings = {"CrucibleKubernetesBackend": {"warm_pods": warm_pods}}
    (config / "crucible_config.json").write_text(json.dumps(settings))
    return {
        **os.environ,
        "CRUCIBLE_BACKEND": "kubernetes",
        "CRUCIBLE_K8S_NAMESPACE": namespace,
        "KUBECONFIG": kube["kubeconfig"],
        "JUPYTER_CONFIG_DIR": str(config),
    }


def run_and_kill_mid_cell(env: dict, url: str, tmp_path: Path) -> None:
    """``crucible run`` a cell printing 0..7 (0.5 s apart) in its own process group, and
    SIGKILL the whole group once two lines have come out: a dispatcher dying mid-cell."""
    cell = tmp_path / "cell.py"
    cell.write_text(
        "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.5)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-m", "crucible_jupyter.cli", "--db-url", url, "run", str(cell)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as proc:
        assert proc.stdout.readline() == "0\n"
        assert proc.stdout.readline() == "1\n"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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
