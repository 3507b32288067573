"""Fixtures for the Kubernetes backend tests, on the real dev cluster (dev/cluster).

The cluster itself is the root conftest's ``kube`` (tests.helpers.cluster: skipped with the
reason when unreachable, failed under CRUCIBLE_CLUSTER_REQUIRED=1). Each test module gets its
own namespace. When a test fails, the namespace's events and every pod's log are added to
the test's report. Helpers (kubectl, Job waits, dispatcher processes) are in tests.helpers.k8s.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.helpers.cluster import Kube, namespace_report


@pytest.fixture(scope="module")
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace for this module, deleted afterwards."""
    name = f"crucible-test-{uuid.uuid4().hex[:8]}"
    kube.run("create", "namespace", name)
    yield name
    kube.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """A failed test's report carries its namespace's events and every pod's log."""
    report = yield
    funcargs = getattr(item, "funcargs", {})
    if report.when == "call" and report.failed and "namespace" in funcargs:
        kube = funcargs.get("kube")
        if isinstance(kube, Kube):
            text = namespace_report(kube, funcargs["namespace"])
            report.sections.append(("cluster events and pod logs", text))
    return report


@pytest.fixture
def k8s(kube: Kube, namespace: str, make_dispatcher):
    """Start dispatchers on the Kubernetes backend in the module's namespace
    (keywords: ``CrucibleKubernetesBackend`` traits; ``dispatcher={...}`` for the rest).
    Without warm pods unless ``warm_pods`` is given: every cell takes the Job path."""

    async def make(db_url: str | None = None, dispatcher: dict | None = None, **backend):
        backend = {"namespace": namespace, "kubeconfig": kube.kubeconfig, "warm_pods": 0,
                   **backend}  # fmt: skip
        return await make_dispatcher(
            db_url,
            kubernetes=backend,
            **{"backend": "kubernetes", "max_concurrency": 50, **(dispatcher or {})},
        )

    return make
