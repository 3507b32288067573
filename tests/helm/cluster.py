"""The dev cluster as the chart's cluster tests use it: kubectl and helm bound to its
admin kubeconfig, and the names of one install of the chart."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

from .chart import REPO, Helm

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
