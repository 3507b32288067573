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
from collections.abc import Iterator

import pytest

from crucible_jupyter.backends.kubernetes import CrucibleKubernetesBackend, objects
from crucible_jupyter.models import Resources

from .chart import CHART
from .cluster import Cluster, Release

pytestmark = pytest.mark.k8s


@pytest.fixture(scope="module")
def release(cluster: Cluster, request) -> Iterator[Release]:
    rel = Release()
    cluster.helm(
        "install", rel.name, str(CHART), "--namespace", rel.namespace, "--create-namespace",
        *rel.values(),
    )  # fmt: skip
    try:
        yield rel
    finally:
        failed = request.session.testsfailed
        if failed:
            for ns in (rel.namespace, rel.executions):
                print(cluster.kubectl("-n", ns, "get", "all,events", check=False).stdout)
        cluster.helm("uninstall", rel.name, "--namespace", rel.namespace, "--wait", check=False)
        for ns in (rel.executions, rel.namespace):
            cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false",
                            check=False)  # fmt: skip


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


def test_zz_uninstall_removes_the_executions_namespace(cluster, release):
    cluster.helm("uninstall", release.name, "--namespace", release.namespace, "--wait")
    done = cluster.kubectl("get", "namespace", release.executions, "-o", "json", check=False)
    gone = done.returncode != 0 or json.loads(done.stdout)["status"]["phase"] == "Terminating"
    assert gone
    # the database's claim is kept on purpose
    claims = cluster.kubectl("-n", release.namespace, "get", "pvc", "-o", "name").stdout
    assert "crucible-db" in claims
