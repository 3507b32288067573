"""Fixtures for the Helm chart tests (helm/crucible), without a cluster.

helm is the one dev/cluster builds from source (``dev/cluster/cluster bin-dir``), or
``$CRUCIBLE_HELM``. Where the cluster build was skipped (``CRUCIBLE_SKIP_CLUSTER=1``, or
not root) there is no helm and these tests skip saying so, unless
``CRUCIBLE_CLUSTER_REQUIRED=1``: then they fail.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .chart import CHART, Helm
from .cluster import SCRIPT, Cluster


def _find_helm() -> tuple[str | None, str]:
    given = os.environ.get("CRUCIBLE_HELM")
    if given:
        return (given, "") if os.access(given, os.X_OK) else (None, f"$CRUCIBLE_HELM={given}")
    script = CHART.parents[1] / "dev" / "cluster" / "cluster"
    try:
        bin_dir = subprocess.run(
            [str(script), "bin-dir"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"dev/cluster/cluster bin-dir failed: {e}"
    helm = Path(bin_dir) / "helm"
    if os.access(helm, os.X_OK):
        return str(helm), ""
    return None, f"{helm} is not built"


@pytest.fixture(scope="session")
def helm() -> Helm:
    """helm, bound to the chart."""
    path, why = _find_helm()
    if path is None:
        reason = (
            f"helm is built with the dev cluster (dev/cluster/cluster up, as root, without"
            f" CRUCIBLE_SKIP_CLUSTER=1) and is not here: {why}"
        )
        if os.environ.get("CRUCIBLE_CLUSTER_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return Helm(path)


@pytest.fixture(scope="module")
def cluster(helm) -> Cluster:
    """The running dev cluster (skip, or fail with CRUCIBLE_CLUSTER_REQUIRED=1, without)."""
    try:
        kubeconfig = (
            os.environ.get("CRUCIBLE_CLUSTER_KUBECONFIG")
            or subprocess.run(
                [str(SCRIPT), "kubeconfig"], capture_output=True, text=True, timeout=60, check=True
            ).stdout.strip()
        )
        bin_dir = Path(helm.path).parent
        subprocess.run(
            [str(bin_dir / "kubectl"), "--kubeconfig", kubeconfig, "get", "--raw", "/readyz"],
            check=True, capture_output=True, timeout=20,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        if os.environ.get("CRUCIBLE_CLUSTER_REQUIRED") == "1":
            pytest.fail(f"the dev cluster is required but not reachable: {e}")
        pytest.skip(f"the dev cluster is not running (start it: dev/cluster/cluster up): {e}")
    return Cluster(kubeconfig, bin_dir, helm)
