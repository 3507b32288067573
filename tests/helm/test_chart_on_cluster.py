"""The chart installed on the real dev cluster: what only an API server can prove.

Installed without waiting for the service's pod (these tests need none to run): the
hub token kept by ``helm upgrade`` (the ``lookup`` branch ``helm template`` cannot take),
the isolation probe read from the cluster, the service account's rights as the API
server's authorizer answers them (``kubectl auth can-i``), Pod Security admission
refusing a privileged pod and admitting the backend's own executor pod, and
``helm uninstall`` taking the executions namespace with it.

Run holding the shared cluster's lock:
``flock /tmp/crucible-k8s.lock .venv/bin/python -m pytest tests/helm -m k8s``.
Each run uses namespaces of its own (``crucible-helm-<random>``), removed at the end.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crucible_jupyter.backends.kubernetes import CrucibleKubernetesBackend, objects
from crucible_jupyter.models import Resources

from .chart import CHART
from .cluster import Cluster, Release, installed

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def release(cluster: Cluster, request) -> Iterator[Release]:
    rel = Release()
    with installed(cluster, request, rel, *rel.values()):
        yield rel


def _token(cluster: Cluster, rel: Release) -> str:
    out = cluster.kubectl(
        "-n",
        rel.namespace,
        "get",
        "secret",
        "crucible-hub-token",
        "-o",
        "jsonpath={.data.api-token}",
    ).stdout
    return base64.b64decode(out).decode()


def _config(cluster: Cluster, rel: Release) -> dict:
    out = cluster.kubectl("-n", rel.namespace, "get", "configmap", "crucible", "-o", "json").stdout
    return json.loads(json.loads(out)["data"]["crucible_config.json"])


def test_upgrade_keeps_the_hub_token(cluster, release):
    before = _token(cluster, release)
    assert len(before) == 64
    cluster.helm(
        "upgrade", release.name, str(CHART), "--namespace", release.namespace,
        *release.values(**{"executions.maxConcurrent": 12}),
    )  # fmt: skip
    assert _config(cluster, release)["CrucibleDispatcher"]["max_concurrency"] == 12  # upgraded
    assert _token(cluster, release) == before
    cluster.helm(
        "upgrade", release.name, str(CHART), "--namespace", release.namespace, "--reuse-values",
    )  # fmt: skip
    assert _token(cluster, release) == before


def test_isolation_probe_read_from_the_cluster(cluster, release):
    slices = json.loads(
        cluster.kubectl(
            "-n", "default", "get", "endpointslices",
            "-l", "kubernetes.io/service-name=kubernetes", "-o", "json",
        ).stdout
    )  # fmt: skip
    expected = sorted(
        {
            (f"[{a}]:{p['port']}" if ":" in a else f"{a}:{p['port']}")
            for s in slices["items"]
            for e in s.get("endpoints") or []
            for a in e["addresses"]
            for p in s.get("ports") or []
        }
    )
    assert expected
    probe = _config(cluster, release)["CrucibleKubernetesBackend"]["isolation_probe"]
    assert probe == ",".join(expected)


CAN = [
    ("create", "jobs.batch", "cells"),
    ("delete", "jobs.batch", "cells"),
    ("watch", "pods", "cells"),
    ("patch", "pods", "cells"),
    ("deletecollection", "pods", "cells"),
    ("get", "pods/log", "cells"),
    ("create", "pods/attach", "cells"),
    ("create", "configmaps", "cells"),
    ("list", "events", "cells"),
    ("get", "networkpolicies.networking.k8s.io", "cells"),
]
CANNOT = [
    ("create", "pods", "cells"),  # only the Job controller makes pods
    ("get", "pods", "cells"),
    ("create", "pods/exec", "cells"),
    ("get", "secrets", "cells"),
    ("list", "secrets", "release"),
    ("get", "secrets", "release"),
    ("delete", "networkpolicies.networking.k8s.io", "cells"),
    ("update", "resourcequotas", "cells"),
    ("create", "roles.rbac.authorization.k8s.io", "cells"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "cells"),
    ("create", "jobs.batch", "release"),
    ("create", "jobs.batch", "default"),
    ("list", "pods", "kube-system"),
    ("create", "pods", "default"),
    ("create", "namespaces", None),
    ("list", "nodes", None),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
    ("list", "jobs.batch", "all"),
]


def _can(cluster: Cluster, rel: Release, verb: str, resource: str, where: str | None) -> str:
    ns = {"cells": rel.executions, "release": rel.namespace}.get(where or "", where)
    scope = ["--all-namespaces"] if ns == "all" else (["-n", ns] if ns else [])
    resource, _, sub = resource.partition("/")  # pods/log: --subresource=log
    if sub:
        scope.append(f"--subresource={sub}")
    done = cluster.kubectl(
        "auth", "can-i", verb, resource, *scope, "--as", rel.service_account, check=False
    )
    return done.stdout.strip()


@pytest.mark.parametrize(("verb", "resource", "where"), CAN)
def test_service_account_can(cluster, release, verb, resource, where):
    assert _can(cluster, release, verb, resource, where) == "yes"


@pytest.mark.parametrize(("verb", "resource", "where"), CANNOT)
def test_service_account_cannot(cluster, release, verb, resource, where):
    assert _can(cluster, release, verb, resource, where) == "no"


def test_privileged_pod_refused_in_the_executions_namespace(cluster, release):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {
            "containers": [
                {
                    "name": "x",
                    "image": "localhost/crucible/executor:dev",
                    "securityContext": {"privileged": True},
                    "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
                }
            ]
        },
    }
    done = cluster.kubectl(
        "-n", release.executions, "create", "--dry-run=server", "-f", "-",
        input=json.dumps(pod), check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert 'violates PodSecurity "restricted' in done.stderr, done.stderr


def test_executor_pods_admitted(cluster, release):
    """The backend's own executor pod (cold and warm) passes Pod Security `restricted`,
    the LimitRange and the quota."""
    backend = CrucibleKubernetesBackend()
    resources = Resources(1.0, 512 << 20)  # the chart's default cell
    for warm in (False, True):
        labels = objects.labels("e", "alice", backend.dispatcher_id)
        job = backend.make_job("crucible-e", labels, "localhost/crucible/executor:dev",
                               resources, 60, {}, warm)  # fmt: skip
        template = job["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"executor-{int(warm)}", "labels": template["metadata"]["labels"]},
               "spec": template["spec"]}  # fmt: skip
        done = cluster.kubectl(
            "-n", release.executions, "create", "--dry-run=server", "-f", "-",
            input=json.dumps(pod), check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr, done.stderr


def test_deny_all_policy_is_the_charts(cluster, release):
    out = cluster.kubectl(
        "-n", release.executions, "get", "networkpolicy", objects.POLICY_NAME, "-o", "json"
    ).stdout
    policy = json.loads(out)
    assert policy["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert policy["spec"]["podSelector"] == {"matchLabels": {objects.APP_LABEL: objects.APP}}


def _service_account_kubeconfig(cluster: Cluster, rel: Release, path: Path) -> Path:
    """A kubeconfig that is the chart's service account (a short-lived token of it)."""
    token = cluster.kubectl(
        "-n", rel.namespace, "create", "token", "crucible", "--duration", "15m"
    ).stdout.strip()  # fmt: skip
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "-o", "json").stdout)
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dev", "cluster": server}],
        "users": [{"name": "crucible", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "dev", "user": "crucible"}}],
        "current-context": "sa",
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def service_stopped(cluster: Cluster, release: Release) -> Release:
    """The release with its service scaled to no pod: the one dispatcher of the executions
    namespace. A service pod starting (after ``helm upgrade`` changed its settings) sweeps
    every executor Job it does not know, so it would delete a Job another dispatcher runs
    there (seen: a cell of the test below killed 0.04 s after it began, exit 137)."""
    cluster.kubectl("-n", release.namespace, "scale", "statefulset", release.name, "--replicas=0")
    cluster.kubectl(
        "-n", release.namespace, "wait", "--for=delete", f"pod/{release.name}-0", "--timeout=120s",
    )  # fmt: skip
    return release


@pytest.mark.parametrize("warm_pods", [0, 1])
def test_cells_run_with_the_roles_rights_only(cluster, service_stopped, tmp_path, warm_pods):
    """A dispatcher holding only the service account's token, with the settings the
    chart rendered for the service, runs a cell in the executions namespace (cold Job,
    or warm pod): the Role grants every call the backend makes. It stands in for the
    service, which is scaled down meanwhile (one dispatcher per executions namespace)."""
    release = service_stopped
    kubeconfig = _service_account_kubeconfig(cluster, release, tmp_path / "sa.kubeconfig")
    rendered = _config(cluster, release)
    settings = {
        "CrucibleDispatcher": rendered["CrucibleDispatcher"],
        "CrucibleKubernetesBackend": {
            **rendered["CrucibleKubernetesBackend"],
            "kubeconfig": str(kubeconfig),
            "warm_pods": warm_pods,
        },
    }
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "crucible_config.json").write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "CRUCIBLE_"))}
    env.update(JUPYTER_CONFIG_DIR=str(config_dir), JUPYTER_DATA_DIR=str(tmp_path / "data"))
    cell = "import os\nprint(6 * 7, os.getuid() > 0)\n"
    cli = [sys.executable, "-m", "crucible_jupyter.cli", "--db-url",
           f"sqlite:///{tmp_path / 'crucible.db'}"]  # fmt: skip
    done = subprocess.run(
        [*cli, "run", "--timeout", "60", "-"],
        input=cell, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "42 True" in done.stdout
    history = subprocess.run([*cli, "history", "--json"], capture_output=True, text=True,
                             timeout=60, env=env, check=True).stdout  # fmt: skip
    (execution,) = json.loads(history)["executions"]
    assert execution["isolation"] == ("kubernetes+warm" if warm_pods else "kubernetes")
    assert "Forbidden" not in done.stderr, done.stderr
    assert "403" not in done.stderr, done.stderr
    # the rendered isolation_probe: no lookup in `default`, which the Role refuses
    assert "isolation probe" not in done.stderr, done.stderr


def test_zz_uninstall_removes_the_executions_namespace(cluster, release):
    cluster.helm("uninstall", release.name, "--namespace", release.namespace, "--wait")
    done = cluster.kubectl("get", "namespace", release.executions, "-o", "json", check=False)
    gone = done.returncode != 0 or json.loads(done.stdout)["status"]["phase"] == "Terminating"
    assert gone
    # the database's claim is kept on purpose
    claims = cluster.kubectl("-n", release.namespace, "get", "pvc", "-o", "name").stdout
    assert "crucible-db" in claims
