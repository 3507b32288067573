"""The dev cluster as the chart's cluster tests use it: kubectl and helm bound to its
admin kubeconfig, and the names of one install of the chart."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .chart import CHART, REPO, Helm

SCRIPT = REPO / "dev" / "cluster" / "cluster"


class Cluster:
    """kubectl and helm bound to the dev cluster's admin kubeconfig."""

    def __init__(self, kubeconfig: str, bin_dir: Path, helm: Helm) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl_path = str(bin_dir / "kubectl")
        self.helm_path = helm.path

    def _run(
        self, cmd: list[str], check: bool, input: str | None = None
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, input=input)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(cmd)}:\n{done.stdout}{done.stderr}")
        return done

    def kubectl(self, *args: str, check: bool = True, input: str | None = None):
        """``kubectl ARGS`` against the dev cluster."""
        return self._run([self.kubectl_path, "--kubeconfig", self.kubeconfig, *args], check, input)

    def helm(self, *args: str, check: bool = True):
        """``helm ARGS`` against the dev cluster."""
        return self._run([self.helm_path, "--kubeconfig", self.kubeconfig, *args], check)

    def require_image(self, image: str) -> None:
        """Skip (fail under CRUCIBLE_CLUSTER_REQUIRED=1, as dev/test runs: it builds the
        images) unless ``image`` is loaded on the node."""
        node = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"][0]
        names = {n for found in node["status"].get("images", []) for n in found.get("names") or []}
        if not any(n.endswith(image) for n in names):
            reason = f"{image} is not loaded on the node (dev/cluster/cluster images builds it)"
            if os.environ.get("CRUCIBLE_CLUSTER_REQUIRED") == "1":
                pytest.fail(reason)
            pytest.skip(reason)


@contextlib.contextmanager
def installed(
    cluster: Cluster, request: pytest.FixtureRequest, rel: Release, *args: str,
    check: bool = True,
) -> Iterator[Release]:  # fmt: skip
    """The chart installed as ``rel`` (``helm install ... ARGS``) while the block runs; then
    uninstalled and its namespaces deleted. When a test of the session failed, what is in
    its namespaces (and the service's log) is printed first."""
    cluster.helm(
        "install", rel.name, str(CHART), "--namespace", rel.namespace, "--create-namespace",
        *args, check=check,
    )  # fmt: skip
    try:
        yield rel
    finally:
        if request.session.testsfailed:
            for ns in (rel.namespace, rel.executions):
                print(cluster.kubectl("-n", ns, "get", "all,networkpolicies,events",
                                      check=False).stdout)  # fmt: skip
            print(cluster.kubectl("-n", rel.namespace, "logs", "statefulset/crucible", "--tail=80",
                                  check=False).stdout)  # fmt: skip
        cluster.helm("uninstall", rel.name, "--namespace", rel.namespace, "--wait", check=False)
        for ns in (rel.executions, rel.namespace):
            cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false",
                            check=False)  # fmt: skip


class Release:
    """One install of the chart: its names."""

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.name = "crucible"
        self.namespace = f"crucible-helm-{suffix}"
        self.executions = f"crucible-helm-{suffix}-cells"
        self.service_account = f"system:serviceaccount:{self.namespace}:crucible"

    def values(self, **more: object) -> list[str]:
        args = ["--set", f"executions.namespace={self.executions}"]
        for key, value in more.items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        return args
