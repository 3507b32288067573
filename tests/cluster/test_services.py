"""What every chart assumes of a cluster, on the dev cluster: Services reach their pods
through a ClusterIP (kube-proxy), names resolve (CoreDNS behind the kube-dns Service),
claims bind (local-path-provisioner, the default StorageClass); and NetworkPolicy still
holds for traffic that kube-proxy rewrote from a ClusterIP to a pod."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cluster import (
    pod_ip,
    pod_manifest,
    pod_phase,
    tcp_reachable,
    versions,
    wait_running,
)

pytestmark = pytest.mark.cluster


VERSIONS = versions()
CLUSTER_DNS = VERSIONS["CLUSTER_DNS"]
DOMAIN = VERSIONS["CLUSTER_DOMAIN"]
NODE_IP = VERSIONS["POD_CIDR"].rsplit(".", 1)[0] + ".1"  # the bridge, the pods' gateway


def _service(name, selector, port, target_port, **spec):
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": selector,
            "ports": [{"port": port, "targetPort": target_port, "protocol": "TCP"}],
            **spec,
        },
    }


def _web(kube, ns, img, name="web"):
    """A pod serving HTTP on 8080 (labels app=NAME) and a Service NAME:80 in front of it;
    returns the Service's ClusterIP."""
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                pod_manifest(name, img, ["python3", "-m", "http.server", "8080"], {"app": name}),
                _service(name, {"app": name}, 80, 8080),
            ],
        },
        ns,
    )
    return kube.get_json("service", name, "-n", ns)["spec"]["clusterIP"]


RESOLVE_AND_GET = r"""
import json, socket, sys, urllib.request
out = {"resolv.conf": open("/etc/resolv.conf").read()}
for name in sys.argv[1:]:
    try:
        out[name] = socket.gethostbyname(name)
    except OSError as e:
        out[name] = "error: %s" % e
try:
    with urllib.request.urlopen("http://web/", timeout=5) as r:
        out["GET http://web/"] = r.status
except OSError as e:
    out["GET http://web/"] = "error: %s" % e
print(json.dumps(out))
"""


def test_pod_resolves_service_names_and_connects_through_cluster_ip(kube, namespace, images):
    """A pod with the default dnsPolicy (ClusterFirst) asks the kube-dns Service, resolves
    the API server's and its own namespace's Service names to their ClusterIPs, and an HTTP
    request to a Service name reaches the pod behind it."""
    img = images["executor"]
    web_ip = _web(kube, namespace, img)
    kube.apply(pod_manifest("client", img, ["sleep", "3600"]), namespace)
    wait_running(kube, namespace, "web", "client")
    api_ip = kube.get_json("service", "kubernetes", "-n", "default")["spec"]["clusterIP"]
    names = ["web", f"web.{namespace}.svc.{DOMAIN}", f"kubernetes.default.svc.{DOMAIN}"]

    def answer():
        p = kube.run(
            "exec", "-n", namespace, "client", "--", "python3", "-c", RESOLVE_AND_GET, *names,
            timeout=60,
        )  # fmt: skip
        out = json.loads(p.stdout.strip().splitlines()[-1])
        return out if out["GET http://web/"] == 200 else None

    out = kube.wait_for(answer, 60, what="an answer from http://web/ through its ClusterIP")
    assert f"nameserver {CLUSTER_DNS}" in out["resolv.conf"], out
    assert out["web"] == web_ip, out
    assert out[f"web.{namespace}.svc.{DOMAIN}"] == web_ip, out
    assert out[f"kubernetes.default.svc.{DOMAIN}"] == api_ip, out


def test_claim_binds_and_pods_of_other_users_write_and_read_it(kube, namespace, images):
    """A claim that names no StorageClass gets the default one; a non-root pod writes to
    the volume, another user's pod reads it after the first is gone; deleting the claim
    deletes the volume and its directory on the node."""
    img = images["executor"]
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "16Mi"}}},
        },
        namespace,
    )  # fmt: skip

    def user_pod(name, uid, command):
        pod = pod_manifest(name, img, command)
        pod["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid}
        pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        pod["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
        return pod

    def finished(name):
        kube.wait_for(
            lambda: pod_phase(kube, namespace, name) in ("Succeeded", "Failed"), 120, what=name
        )
        assert pod_phase(kube, namespace, name) == "Succeeded", kube.run(
            "logs", "-n", namespace, name, check=False
        ).stdout

    write = "echo written by $(id -u) > /data/hello && cat /data/hello"
    kube.apply(user_pod("writer", 1000, ["sh", "-c", write]), namespace)
    finished("writer")
    pvc = kube.get_json("pvc", "data", "-n", namespace)
    assert pvc["status"]["phase"] == "Bound", pvc["status"]
    assert pvc["spec"]["storageClassName"] == "local-path"
    pv = kube.get_json("pv", pvc["spec"]["volumeName"])
    path = Path(pv["spec"]["hostPath"]["path"])
    state = os.environ.get("CRUCIBLE_CLUSTER_STATE", "/var/lib/crucible-cluster")
    assert path.is_relative_to(state), path
    assert path.joinpath("hello").read_text() == "written by 1000\n"

    kube.run("delete", "pod", "writer", "-n", namespace)
    kube.apply(user_pod("reader", 2000, ["cat", "/data/hello"]), namespace)
    finished("reader")
    assert kube.run("logs", "-n", namespace, "reader").stdout == "written by 1000\n"

    kube.run("delete", "pod", "reader", "-n", namespace)
    kube.run("delete", "pvc", "data", "-n", namespace)
    kube.wait_for(
        lambda: kube.run("get", "pv", pv["metadata"]["name"], check=False).returncode != 0,
        120,
        what="the volume deleted with its claim",
    )
    kube.wait_for(lambda: not path.exists(), 30, what=f"{path} removed")


def test_deny_all_pod_cannot_reach_a_cluster_ip(kube, namespace, images):
    """kube-proxy rewrites a ClusterIP to a pod's address before the forward chain, where
    kube-router's policies see it: a pod under a deny-all policy reaches neither a
    Service's ClusterIP nor the API server's, while a pod no policy selects reaches both;
    a policy denying ingress to the Service's pod cuts the unselected pod off too."""
    img = images["executor"]
    web_ip = _web(kube, namespace, img)
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                pod_manifest("isolated", img, ["sleep", "3600"], {"role": "isolated"}),
                pod_manifest("free", img, ["sleep", "3600"], {"role": "free"}),
            ],
        },
        namespace,
    )
    wait_running(kube, namespace, "web", "isolated", "free")
    api_ip = kube.get_json("service", "kubernetes", "-n", "default")["spec"]["clusterIP"]
    web, api = f"{web_ip}:80", f"{api_ip}:443"
    both = {web: True, api: True}

    # Before any policy both pods reach both ClusterIPs (so the probes can fail).
    for pod in ("isolated", "free"):
        kube.wait_for(
            lambda pod=pod: tcp_reachable(kube, namespace, pod, web, api) == both,
            60,
            what=f"{pod} reaches both ClusterIPs before any policy",
        )

    kube.apply(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all"},
            "spec": {
                "podSelector": {"matchLabels": {"role": "isolated"}},
                "policyTypes": ["Ingress", "Egress"],
            },
        },
        namespace,
    )
    kube.wait_for(
        lambda: tcp_reachable(kube, namespace, "isolated", web, api) == {web: False, api: False},
        60,
        what="deny-all enforced on traffic to ClusterIPs",
    )
    assert tcp_reachable(kube, namespace, "isolated", web, api) == {web: False, api: False}
    kube.wait_for(
        lambda: tcp_reachable(kube, namespace, "free", web, api) == both,
        30,
        what="the pod no policy selects still reaches both",
    )

    # Ingress side: after the rewrite, the destination is the web pod, which a policy
    # now closes to everyone.
    kube.apply(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "web-closed"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]},
        },
        namespace,
    )
    kube.wait_for(
        lambda: tcp_reachable(kube, namespace, "free", web, api) == {web: False, api: True},
        60,
        what="ingress policy of the Service's pod enforced through its ClusterIP",
    )


def test_node_ports_stay_closed_to_pods(kube, namespace, images):
    """kube-proxy serves a NodePort Service on the bridge address (from the host), but a
    pod's packets to the node on the node-port range are still dropped (raw table), as
    before kube-proxy ran."""
    img = images["executor"]
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                pod_manifest("web", img, ["python3", "-m", "http.server", "8080"], {"app": "web"}),
                _service("web", {"app": "web"}, 80, 8080, type="NodePort"),
                pod_manifest("client", img, ["sleep", "3600"]),
            ],
        },
        namespace,
    )
    wait_running(kube, namespace, "web", "client")
    node_port = kube.get_json("service", "web", "-n", namespace)["spec"]["ports"][0]["nodePort"]
    target = f"{NODE_IP}:{node_port}"
    web_pod = pod_ip(kube, namespace, "web") + ":8080"

    def host_reaches():
        p = subprocess.run(
            ["python3", "-c", f"import urllib.request as u; print(u.urlopen('http://{target}/', timeout=3).status)"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return p.stdout.strip() == "200"

    # The Service works (from the host), and the client reaches its pod directly.
    kube.wait_for(host_reaches, 60, what=f"the host reaches the NodePort {target}")
    kube.wait_for(
        lambda: tcp_reachable(kube, namespace, "client", web_pod)[web_pod], 60, what="pod to pod"
    )
    drops = _raw_nodeport_drops()
    assert tcp_reachable(kube, namespace, "client", target) == {target: False}
    assert _raw_nodeport_drops() > drops, "the probe was not dropped in the raw table"


def _raw_nodeport_drops() -> int:
    out = subprocess.run(
        ["iptables", "-t", "raw", "-L", "CRUCIBLE-DEV-NODEPORTS", "-n", "-v", "-x"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(int(line.split()[0]) for line in out.splitlines() if "DROP" in line)


def test_dns_outside_the_cluster_domain_is_not_answered_with_an_address(kube, namespace, images):
    """CoreDNS has no upstream (pods have no route off this machine): a name outside the
    cluster domain gets no address."""
    kube.apply(pod_manifest("client", images["executor"], ["sleep", "3600"]), namespace)
    wait_running(kube, namespace, "client")
    code = (
        "import socket\n"
        "try:\n    print(socket.gethostbyname('example.invalid'))\n"
        "except OSError as e:\n    print('error', type(e).__name__)\n"
    )
    start = time.monotonic()
    out = kube.run("exec", "-n", namespace, "client", "--", "python3", "-c", code).stdout
    assert out.startswith("error"), out
    print(f"outside name refused in {int((time.monotonic() - start) * 1000)} ms")
