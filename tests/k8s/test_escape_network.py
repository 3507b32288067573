"""Network escapes from an executor pod on the real dev cluster, by every address family
(issue 13): the node's IPv6 link-local address, other executions over IPv6 multicast, the
node's NodePort range; and `crucible doctor` failing where the filtering is left open."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, stream_text
from tests.helpers.k8s import kubectl

pytestmark = pytest.mark.k8s

NODE_IP = "10.244.0.1"  # dev/cluster: the bridge cni0, the pods' gateway
BRIDGE = "cni0"

CONNECT = r"""
import json, socket
def tcp(host, port):
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        s = socket.socket(info[0], socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(info[4])
        s.close()
        return "open"
    except OSError as e:
        return type(e).__name__ + ": " + str(e.strerror or e)
def udp(host, port):
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        s = socket.socket(info[0], socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect(info[4])
        s.send(b"ping")
        return "open: " + s.recv(64).decode()
    except OSError as e:
        return type(e).__name__ + ": " + str(e.strerror or e)
"""


def _host_link_locals() -> list[str]:
    """The node's IPv6 link-local addresses a pod could aim at: the bridge's (if it has
    IPv6) and the EUI-64 address of the bridge's MAC (what it has when IPv6 is on)."""
    found = set()
    out = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", BRIDGE, "scope", "link"],
                         capture_output=True, text=True).stdout  # fmt: skip
    found.update(line.split()[3].split("/")[0] for line in out.splitlines())
    mac = bytearray.fromhex(
        Path(f"/sys/class/net/{BRIDGE}/address").read_text().strip().replace(":", "")
    )
    mac[0] ^= 2
    found.add(socket.inet_ntop(socket.AF_INET6, b"\xfe\x80" + bytes(6) + mac[:3]
                               + b"\xff\xfe" + mac[3:]))  # fmt: skip
    return sorted(found)


def _results(events) -> dict:
    return json.loads(stream_text(events, "stdout").split("RESULTS ", 1)[1])


async def test_node_link_local_ipv6_is_not_reached(k8s):
    """Seen: TCP to the node's cni0 link-local address on 6443 reached the API server
    (kube-router filters IPv4 only). Now executor pods have no IPv6 at all."""
    d = await k8s()
    targets = _host_link_locals()
    code = CONNECT + textwrap.dedent(f"""
        results = {{}}
        for addr in {targets!r}:
            for port in (6443, 10250):
                results[f"[{{addr}}]:{{port}}"] = tcp(addr + "%eth0", port)
        results["if_inet6"] = open("/proc/net/if_inet6").read()
        print("RESULTS " + json.dumps(results))
    """)
    execution, events = await run_cell(d, code, timeout=60)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    results = _results(events)
    assert results.pop("if_inet6") == "", "executor pods must have no IPv6 address"
    assert results, results
    assert not [k for k, v in results.items() if v.startswith("open")], results


LISTENER = r"""
import json, select, socket, time
socks = []
for family, kind, host in ((socket.AF_INET6, socket.SOCK_DGRAM, "::"),
                           (socket.AF_INET6, socket.SOCK_STREAM, "::"),
                           (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
                           (socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0")):
    try:
        s = socket.socket(family, kind)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, PORT))
        if kind == socket.SOCK_STREAM:
            s.listen(8)
        socks.append(s)
    except OSError as e:
        print("cannot bind", family, kind, e)
addrs = [l.split() for l in open("/proc/net/if_inet6").read().splitlines()]
known = [socket.inet_ntop(socket.AF_INET6, bytes.fromhex(a[0])) for a in addrs if a[-1] != "lo"]
known.append(socket.gethostbyname(socket.gethostname()))  # (the kubelet's /etc/hosts)
print("LISTENING", json.dumps(known), flush=True)
end = time.monotonic() + 30
while time.monotonic() < end:
    for s in select.select(socks, [], [], 0.5)[0]:
        if s.type == socket.SOCK_STREAM:
            conn, peer = s.accept()
            conn.sendall(b"secret-from-the-other-execution")
            conn.close()
        else:
            data, peer = s.recvfrom(64)
            s.sendto(b"secret-from-the-other-execution", peer)
        print("CONTACT", peer[0], flush=True)
"""

SEEKER = r"""
import json, socket, time
found, results = set(), {}
# discovery: the all-nodes multicast group, as the attack did
try:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    for _ in range(6):
        s.sendto(b"hello", ("ff02::1%eth0", PORT))
        try:
            data, peer = s.recvfrom(64)
            found.add(peer[0])
            results["multicast"] = "open: " + data.decode()
        except socket.timeout:
            pass
    results.setdefault("multicast", "no answer")
except OSError as e:
    results["multicast"] = type(e).__name__ + ": " + str(e.strerror or e)
for addr in sorted(found | set(KNOWN)):
    scoped = addr + "%eth0" if addr.startswith("fe80") else addr
    results["tcp " + addr] = tcp(scoped, PORT)
    results["udp " + addr] = udp(scoped, PORT)
print("RESULTS " + json.dumps(results))
"""


async def test_two_executions_cannot_find_each_other_over_ipv6(k8s, tmp_path):
    """Seen: two executions of different dispatchers found each other by IPv6 multicast
    (ff02::1) and exchanged data over UDP and TCP. Here one listens (and answers anything),
    the other looks for it by multicast and by its addresses, which the test hands over."""
    port = 41000 + uuid.uuid4().int % 1000
    d1 = await k8s(f"sqlite:///{tmp_path}/one.db")
    d2 = await k8s(f"sqlite:///{tmp_path}/two.db")
    listener = await d1.submit({"code": f"PORT = {port}\n" + LISTENER, "timeout": 120})
    listening = None
    async for event in d1.subscribe(listener.id):
        if event.type == "stream" and "LISTENING" in event.data["text"]:
            listening = json.loads(event.data["text"].split("LISTENING", 1)[1].splitlines()[0])
            break
    assert listening is not None, (await d1.get(listener.id)).reason
    # its addresses: IPv6 ones (none where IPv6 is off) and its IPv4 one
    seeker = CONNECT + f"PORT = {port}\nKNOWN = {listening!r}\n" + SEEKER
    execution, events = await run_cell(d2, seeker, timeout=60)
    await d1.cancel(listener.id)
    listener_events = [e async for e in d1.subscribe(listener.id)]
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    results = _results(events)
    assert not [k for k, v in results.items() if v.startswith("open")], results
    assert "CONTACT" not in stream_text(listener_events), stream_text(listener_events)


class _HostListener:
    """TCP and UDP listeners on the node (all addresses) on one port; what reached them."""

    def __init__(self, port: int):
        self.port, self.contacts = port, []
        self.tcp = socket.create_server(("0.0.0.0", port))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", port))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True)
                        for s in (self.tcp, self.udp)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                if sock.type == socket.SOCK_STREAM:
                    conn, peer = sock.accept()
                    conn.sendall(b"node")
                    conn.close()
                else:
                    _, peer = sock.recvfrom(64)
                    sock.sendto(b"node", peer)
                self.contacts.append(peer[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.tcp.close()
        self.udp.close()


async def test_node_ports_are_not_reached(k8s):
    """Seen: kube-router exempts 30000-32767 from every policy for traffic to the node: a
    cell reached a listener the node had there, over TCP and UDP."""
    d = await k8s()
    port = 30000 + uuid.uuid4().int % 2768
    listener = _HostListener(port)
    try:
        code = CONNECT + textwrap.dedent(f"""
            print("RESULTS " + json.dumps({{"tcp": tcp({NODE_IP!r}, {port}),
                                           "udp": udp({NODE_IP!r}, {port})}}))
        """)
        execution, events = await run_cell(d, code, timeout=60)
    finally:
        listener.close()
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    results = _results(events)
    assert not [k for k, v in results.items() if v.startswith("open")], results
    assert listener.contacts == [], f"a pod reached the node's port {port}: {listener.contacts}"


OPEN_POLICIES = {
    # every executor may talk to every other executor (the API server stays unreachable,
    # so the runner's own pre-cell check passes: only the doctor's two-pod probe sees it)
    "executors-to-executors": {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "crucible-executor"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {}}]}],
        "egress": [{"to": [{"podSelector": {}}]}],
    },
    # everything allowed (policies add up: this one undoes the deny-all)
    "allow-all": {
        "podSelector": {},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [{}],
        "egress": [{}],
    },
}


@pytest.mark.parametrize("policy", sorted(OPEN_POLICIES))
def test_doctor_fails_where_the_filtering_is_open(kube, tmp_path, policy):
    """Doctor said "network isolation: enforced" after probing one IPv4 address. On a
    namespace whose policies leave a path open it must say NOT enforced, and fail."""
    namespace = f"crucible-open-{uuid.uuid4().hex[:8]}"
    kubectl(kube, "create", "namespace", namespace)
    try:
        body = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "leave-it-open"}, "spec": OPEN_POLICIES[policy]}  # fmt: skip
        kubectl(kube, "-n", namespace, "apply", "-f", "-", input=json.dumps(body))
        env = {**os.environ, "KUBECONFIG": kube.kubeconfig,
               "CRUCIBLE_K8S_NAMESPACE": namespace}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "crucible_jupyter.cli", "--db-url",
             f"sqlite:///{tmp_path}/d.db", "doctor", "--backend", "kubernetes", "--json"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    finally:
        kubectl(kube, "delete", "namespace", namespace, "--wait=false", check=False)
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    isolation = checks["network isolation"]
    assert not isolation["ok"], isolation
    assert isolation["detail"].startswith("NOT enforced"), isolation
    assert done.returncode != 0


async def test_the_cell_does_not_get_the_kubelets_api_server_variables(k8s):
    """The kubelet puts KUBERNETES_SERVICE_HOST/PORT and KUBERNETES_PORT* into every
    container even with enableServiceLinks: false; the runner re-executes itself without
    them, so the cell finds them neither in os.environ nor in /proc/self/environ."""
    d = await k8s()
    code = textwrap.dedent("""
        import json, os
        print("RESULTS " + json.dumps({
            "environ": sorted(k for k in os.environ if k.startswith("KUBERNETES")),
            "proc": b"KUBERNETES" in open("/proc/self/environ", "rb").read(),
        }))
    """)
    execution, events = await run_cell(d, code, timeout=60)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    assert _results(events) == {"environ": [], "proc": False}
