"""The Kubernetes backend on the dev cluster: Jobs, dispatcher processes, kills mid-cell."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.cluster import Kube


def kubectl(kube: Kube, *args: str, input: str | None = None, check: bool = True) -> str:
    """Run kubectl against the dev cluster; its stdout (AssertionError if it fails and ``check``)."""
    return kube.out(*args, input=input, check=check)


@contextlib.contextmanager
def resource_quota(kube: Kube, namespace: str, name: str, hard: dict[str, str]) -> Iterator[None]:
    """A ResourceQuota ``name`` with ``hard`` limits in ``namespace`` while the block runs."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": name},
        "spec": {"hard": hard},
    }
    kubectl(kube, "-n", namespace, "apply", "-f", "-", input=json.dumps(quota))
    try:
        yield
    finally:
        kubectl(kube, "-n", namespace, "delete", "resourcequota", name)


async def wait_until_job_deleted(
    kube: Kube, namespace: str, job: str, *, fully: bool = False
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
    raise AssertionError(f"the Job {job} was not deleted after the execution finished")


def dispatcher_env(kube: Kube, namespace: str, tmp_path: Path, warm_pods: int) -> dict[str, str]:
    """Environment of a dispatcher process (``crucible run``) on ``namespace``, with
    ``warm_pods`` set through a crucible_config.json of its own."""
    config = tmp_path / "jupyter-config"
    config.mkdir(exist_ok=True)
    settings = {"CrucibleKubernetesBackend": {"warm_pods": warm_pods}}
    (config / "crucible_config.json").write_text(json.dumps(settings))
    return {
        **os.environ,
        "CRUCIBLE_BACKEND": "kubernetes",
        "CRUCIBLE_K8S_NAMESPACE": namespace,
        "KUBECONFIG": kube.kubeconfig,
        "JUPYTER_CONFIG_DIR": str(config),
    }


def run_and_kill_mid_cell(env: dict[str, str], url: str, tmp_path: Path) -> None:
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
        assert proc.stdout is not None
        assert proc.stdout.readline() == "0\n"
        assert proc.stdout.readline() == "1\n"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
