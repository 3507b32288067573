"""Every NetworkPolicy selects the pods it is for, and admits only the peers it should.

The pods' labels come from where those pods get them: the service's pod from the
rendered StatefulSet; executor pods (a cold Job's and a warm pod's) from the Kubernetes
backend's own ``make_job``; JupyterHub's pods from the labels zero-to-jupyterhub and
KubeSpawner give them (z2jh ``jupyterhub.matchLabels``: ``component``, ``app``,
``release``; KubeSpawner ``_build_pod_labels``: ``component: singleuser-server`` and the
common labels z2jh sets, ``app``/``release``; read in z2jh @48ea50e and kubespawner's
``spawner.py``).
"""

from __future__ import annotations

import pytest

from crucible_jupyter.backends.kubernetes import CrucibleKubernetesBackend, objects
from crucible_jupyter.models import Resources

from .chart import NAMESPACE, selector_matches

pytestmark = pytest.mark.helm

HUB_RELEASE = "jupyterhub"


def z2jh_pod_labels(component: str, release: str = HUB_RELEASE) -> dict[str, str]:
    """Labels of a z2jh pod (hub, proxy) or a KubeSpawner user pod of release ``release``."""
    labels = {
        "component": component,
        "app": "jupyterhub",
        "release": release,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/name": "jupyterhub",
        "app.kubernetes.io/instance": release,
    }
    if component == "singleuser-server":
        labels.update({"hub.jupyter.org/username": "alice", "hub.jupyter.org/servername": ""})
    return labels


def namespace_labels(name: str) -> dict[str, str]:
    """Labels every namespace carries (set by Kubernetes)."""
    return {"kubernetes.io/metadata.name": name}


def admits(policy: dict, pod: dict[str, str], namespace: str, port: int) -> bool:
    """Whether the policy's ingress rules admit a pod with these labels in ``namespace``
    on ``port`` (policies of other namespaces: peers need a namespaceSelector)."""
    own = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress") or []:
        ports = [p["port"] for p in rule.get("ports") or []]
        if ports and port not in ports and "http" not in ports:
            continue
        for peer in rule.get("from") or []:
            ns_sel = peer.get("namespaceSelector")
            ns_ok = (
                selector_matches(ns_sel, namespace_labels(namespace))
                if ns_sel is not None
                else namespace == own
            )
            pod_ok = selector_matches(peer.get("podSelector") or {}, pod)
            if ns_ok and pod_ok:
                return True
    return False


@pytest.fixture(scope="module")
def rendered(helm):
    return helm.render()


def _service_policy(rendered) -> dict:
    return rendered.one("NetworkPolicy", "crucible")


def test_service_policy_selects_the_service_pod(rendered):
    policy = _service_policy(rendered)
    pod = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["metadata"]["namespace"] == NAMESPACE
    assert selector_matches(policy["spec"]["podSelector"], pod)
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_service_admits_only_the_hub_and_user_servers(rendered):
    policy = _service_policy(rendered)
    port = rendered.one("Service")["spec"]["ports"][0]["port"]
    assert admits(policy, z2jh_pod_labels("hub"), NAMESPACE, port)
    assert admits(policy, z2jh_pod_labels("singleuser-server"), NAMESPACE, port)
    # not the proxy (unless allowProxy), not another hub release, not the same labels
    # in another namespace, not an executor, not an unlabelled pod
    assert not admits(policy, z2jh_pod_labels("proxy"), NAMESPACE, port)
    assert not admits(policy, z2jh_pod_labels("hub", release="other"), NAMESPACE, port)
    assert not admits(policy, z2jh_pod_labels("singleuser-server"), "elsewhere", port)
    assert not admits(policy, {objects.APP_LABEL: objects.APP}, "crucible-executions", port)
    assert not admits(policy, {}, NAMESPACE, port)


def test_service_policy_follows_the_hub_release_and_namespace(helm):
    rendered = helm.render(
        values={
            "jupyterhub.releaseName": "hub2",
            "jupyterhub.namespace": "lab",
            "networkPolicy.allowProxy": True,
        }
    )
    policy = _service_policy(rendered)
    assert admits(policy, z2jh_pod_labels("hub", "hub2"), "lab", 8576)
    assert admits(policy, z2jh_pod_labels("proxy", "hub2"), "lab", 8576)
    assert not admits(policy, z2jh_pod_labels("hub", "hub2"), NAMESPACE, 8576)


def _executor_pods() -> dict[str, dict[str, str]]:
    """Pod labels of a cold Job and of a warm pod, as the backend makes them."""
    backend = CrucibleKubernetesBackend()
    resources = Resources(1.0, 256 << 20)
    cold_labels = objects.labels("exec-1", "alice", backend.dispatcher_id)
    cold = backend.make_job("crucible-exec-1", cold_labels, "img", resources, 60, {})
    warm_labels = objects.warm_labels("crucible-warm-1", backend.dispatcher_id, "key1")
    warm = backend.make_job("crucible-warm-1", warm_labels, "img", resources, 60, {}, True)
    return {
        "cold": cold["spec"]["template"]["metadata"]["labels"],
        "warm": warm["spec"]["template"]["metadata"]["labels"],
    }


def test_deny_all_selects_cold_and_warm_executor_pods(rendered):
    policy = rendered.one("NetworkPolicy", "deny-all")
    assert policy["metadata"]["namespace"] == "crucible-executions"
    assert policy["metadata"]["name"] == objects.POLICY_NAME  # the backend finds it
    for kind, labels in _executor_pods().items():
        assert selector_matches(policy["spec"]["podSelector"], labels), kind
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["spec"]["ingress"] == []
    assert policy["spec"]["egress"] == []


def test_deny_all_is_the_backends_policy(rendered):
    """The chart's policy is the one the backend would create (its create then answers
    409 and leaves it)."""
    policy = rendered.one("NetworkPolicy", "deny-all")
    assert policy["spec"] == objects.make_network_policy()["spec"]


def test_deny_all_does_not_select_the_service(rendered):
    policy = rendered.one("NetworkPolicy", "deny-all")
    pod = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert not selector_matches(policy["spec"]["podSelector"], pod)


def test_selector_matching_can_fail():
    assert selector_matches({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"})
    assert not selector_matches({"matchLabels": {"a": "1"}}, {"a": "2"})
    assert not selector_matches(
        {"matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]}, {"a": "y"}
    )
