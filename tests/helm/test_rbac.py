"""The chart's RBAC is exactly what the Kubernetes backend calls, and nothing cluster-scoped.

The expected rules are derived from the backend's source: every Kubernetes API method
``backends/kubernetes/*.py`` calls is mapped to its resource and verb. A new call
therefore fails this test until the Role grants it (or the call is listed below as one the
chart makes unnecessary), and a grant the code no longer needs fails it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .chart import VARIANTS

pytestmark = pytest.mark.helm

PACKAGE = Path(__file__).resolve().parents[2] / "crucible_jupyter"
BACKEND = PACKAGE / "backends" / "kubernetes"

#: kubernetes_asyncio method prefix -> RBAC verb
VERBS = {
    "create": "create",
    "read": "get",
    "list": "list",
    "patch": "patch",
    "delete": "delete",
    "delete_collection": "deletecollection",
    "replace": "update",
}
#: the snake-case kind in a method name -> (apiGroup, resource)
RESOURCES = {
    "config_map": ("", "configmaps"),
    "pod": ("", "pods"),
    "pod_log": ("", "pods/log"),
    "pod_attach": ("", "pods/attach"),
    "event": ("", "events"),
    "job": ("batch", "jobs"),
    "network_policy": ("networking.k8s.io", "networkpolicies"),
}
#: calls the chart makes unnecessary, each with the setting it renders and why
NOT_GRANTED = {
    # cluster-scoped: the chart creates the namespace; it sets create_namespace = False
    "create_namespace",
    # the API server's addresses in `default`, for the isolation probe: the chart gives
    # isolation_probe (executions.isolationProbe, else read by helm at install time)
    "list_namespaced_endpoint_slice",
    "read_namespaced_endpoints",
    # every Service of the cluster, for the doctor's node-port probe (optional: a
    # refusal only leaves those ports out)
    "list_service_for_all_namespaces",
}

NAME = (
    r"(create|read|list|patch|delete_collection|delete|replace|connect_get)"
    r"_(namespaced_|)([a-z_]+?)(_for_all_namespaces)?"
)
#: an API client's method, called or passed (``self.call(self.core.read_..., ...)``); the
#: clients are ``core``/``batch``/``networking``, ``api`` (websockets) and ``...Api(x)``
CALL = re.compile(r"(?:\bcore|\bbatch|\bnetworking|\bapi|Api\([^)]*\))\.(" + NAME + r")(?=[(,)\s])")


def calls_in_backend() -> set[str]:
    """Every Kubernetes API method name crucible_jupyter's source mentions."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for m in CALL.finditer(path.read_text()):
            found.add(m.group(1))
    return found


def expected_rules() -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs} the backend's calls need, in its namespace."""
    rules: dict[tuple[str, str], set[str]] = {}
    watched = "watch.Watch()" in (BACKEND / "reflector.py").read_text()
    for call in calls_in_backend() - NOT_GRANTED:
        m = re.fullmatch(NAME, call)
        assert m, call
        action, namespaced, kind = m.group(1), m.group(2), m.group(3)
        assert namespaced, f"{call} is not namespaced: the chart has no cluster-wide rule"
        assert kind in RESOURCES, f"{call}: add its resource to RESOURCES (and the Role)"
        key = RESOURCES[kind]
        if action == "connect_get":  # a websocket: GET, and create from Kubernetes 1.35
            rules.setdefault(key, set()).update({"get", "create"})
        else:
            rules.setdefault(key, set()).add(VERBS[action])
        if key == ("", "pods") and action == "list" and watched:
            rules[key].add("watch")
    return rules


def test_the_derivation_sees_the_backend_calls():
    """The scan finds the calls it must (it fails if the code moves out of sight)."""
    calls = calls_in_backend()
    for call in ("create_namespaced_job", "list_namespaced_pod", "connect_get_namespaced_pod_attach",
                 "delete_collection_namespaced_pod", "read_namespaced_pod_log"):  # fmt: skip
        assert call in calls
    assert calls >= NOT_GRANTED, "a call listed as not granted is gone: drop it from the list"


def _role_rules(role: dict) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames")
        assert not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_role_grants_exactly_what_the_backend_calls(helm):
    role = helm.render().one("Role")
    assert role["metadata"]["namespace"] == "crucible-executions"
    assert _role_rules(role) == expected_rules()


def test_role_has_no_wildcards_no_secrets(helm):
    for rule in helm.render().one("Role")["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field]
        assert not {"secrets", "serviceaccounts", "roles", "rolebindings"} & set(rule["resources"])
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nothing_cluster_scoped(helm, variant):
    """No ClusterRole or ClusterRoleBinding at all; the only cluster-scoped object is the
    executions namespace; every other object names its namespace."""
    rendered = helm.render(values=VARIANTS[variant])
    kinds = rendered.kinds()
    assert "ClusterRole" not in kinds
    assert "ClusterRoleBinding" not in kinds
    for obj in rendered.objects:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == "crucible-executions"
            continue
        assert obj["metadata"].get("namespace"), f"{obj['kind']} has no namespace"


def test_role_and_binding_only_in_the_executions_namespace(helm):
    rendered = helm.render(values={"executions.namespace": "cells"})
    role, binding = rendered.one("Role"), rendered.one("RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "cells"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = rendered.one("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "jhub"}
    ]
    workload = rendered.one("StatefulSet")
    assert workload["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_the_service_is_told_not_to_need_what_is_not_granted(helm):
    """The calls left out of the Role are switched off in the service's settings."""
    backend = helm.render(values={"executions.isolationProbe": "10.0.0.1:6443"}).config()[
        "CrucibleKubernetesBackend"
    ]
    assert backend["create_namespace"] is False
    assert backend["isolation_probe"] == "10.0.0.1:6443"
    assert backend["namespace"] == "crucible-executions"


def test_rbac_create_false_renders_no_rbac(helm):
    kinds = helm.render(values={"rbac.create": False}).kinds()
    assert "Role" not in kinds
    assert "RoleBinding" not in kinds
