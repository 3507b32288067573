"""What `crucible doctor --backend kubernetes` runs to say whether executors are isolated.

Two real executor pods, under the same deny-all policy as every cell:

* a **listener** (:func:`listener_code`) binds TCP and UDP on one port over IPv4 and IPv6,
  prints its addresses, answers whatever reaches it and says so (``CONTACT``);
* a **prober** (:func:`prober_code`) then tries, over TCP and UDP, each of: the API server's
  addresses; the node as the pod sees it (its IPv4 gateway, and over IPv6 its default
  routers and the link-local address formed from the gateway's MAC, scoped to the pod's
  interface — the runner's own pre-cell check, loaded from the pod's ``runner.py`` — and
  the node's own address on those ports and the kubelet's, 10250); the
  listener by IPv4 and IPv6 address and by IPv6 multicast (``ff02::1``, UDP, and ICMPv6
  echo where ping sockets are allowed: any host answering) and IPv4 broadcast; and the
  node's NodePort range (30000-32767).

What counts as *reached* (:func:`network_check`): a TCP connection accepted or a UDP answer,
anywhere; the listener hearing anything; and, at a node port, also a *refusal* (a TCP reset
or an ICMP port-unreachable): no listener is known to be there, so a refusal is the node's
kernel answering — a path exists. (A policy enforcer that rejects instead of dropping looks
the same; doctor then fails, saying why.) At an address where something is known to listen
(the API server, the listener), a refusal is the enforcer's reject. No answer, or no route
(no IPv6 in the pod at all), is blocked. "enforced" is reported only when every probe of
IPv4, IPv6 and the node ports ran and reached nothing.
"""

from __future__ import annotations

import json

from ..base import Check

#: The port the listener binds (TCP and UDP, IPv4 and IPv6).
PORT = 41789
#: NodePort-range ports probed on every node address (besides those of existing Services).
NODE_PORTS = (30000, 31234, 32767)

_LISTENER = r"""
import json, os, select, socket, time
PORT, SECONDS = {port}, {seconds}
socks = []
for family, kind, host in ((socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"),
                           (socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0"),
                           (socket.AF_INET6, socket.SOCK_STREAM, "::"),
                           (socket.AF_INET6, socket.SOCK_DGRAM, "::")):
    try:
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, PORT))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        socks.append(s)
    except OSError:
        pass
ipv4 = []
try:
    ipv4.append(socket.gethostbyname(socket.gethostname()))  # (the kubelet's /etc/hosts)
except OSError:
    pass
ipv6 = []
try:
    for line in open("/proc/net/if_inet6").read().splitlines():
        f = line.split()
        if f[-1] != "lo":
            ipv6.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[0])))
except OSError:
    pass
print("LISTENING " + json.dumps({{"ipv4": ipv4, "ipv6": ipv6, "port": PORT,
                                 "bound": len(socks)}}), flush=True)
end = time.monotonic() + SECONDS
while time.monotonic() < end:
    ready, _, _ = select.select(socks, [], [], 0.5)
    for s in ready:
        try:
            if s.type == socket.SOCK_STREAM:
                conn, peer = s.accept()
                conn.sendall(b"pong")
                conn.close()
                print("CONTACT tcp", peer[0], flush=True)
            else:
                data, peer = s.recvfrom(512)
                s.sendto(b"pong", peer)
                print("CONTACT udp", peer[0], flush=True)
        except OSError:
            pass
"""

_PROBER = r"""
import importlib.util, json, os, socket, threading
PLAN = json.loads({plan!r})
spec = importlib.util.spec_from_file_location("crucible_runner", {runner!r})
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
results = []

def attempt(exchange, family=None, host=None, port=None, kind=socket.SOCK_DGRAM, proto=0):
    # one socket (to host:port, numeric, or of family), 1.5 s per step; what became of it
    try:
        if host is not None:
            infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_NUMERICHOST)
            family, address = infos[0][0], infos[0][4]
        with socket.socket(family, kind, proto) as s:
            s.settimeout(1.5)
            return exchange(s, address if host is not None else None)
    except ConnectionRefusedError:
        return "refused"
    except socket.timeout:
        return "no answer"
    except OSError as e:
        return "unreachable (%s)" % (e.strerror or e)

def tcp(s, address):
    s.connect(address)
    return "open"

def udp(s, address):
    s.connect(address)
    s.send(b"ping")
    s.recv(512)
    return "open"

def udp_many(s, address):  # multicast/broadcast: answers come from other addresses
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.sendto(b"ping", address)
    data, peer = s.recvfrom(512)
    return "open (answered by %s)" % peer[0]

def ping6(host):
    # ICMPv6 echo to all nodes, where ping sockets are allowed (net.ipv4.ping_group_range)
    def echo(s, _):
        own = {{socket.inet_ntop(socket.AF_INET6, bytes.fromhex(l.split()[0]))
                for l in open("/proc/net/if_inet6")}}
        s.sendto(b"\x80\x00\x00\x00\x00\x01\x00\x01crucible", (host, 0))
        while True:
            data, peer = s.recvfrom(512)
            if peer[0].split("%")[0] not in own:
                return "open (answered by %s)" % peer[0]
    return attempt(echo, socket.AF_INET6, proto=socket.IPPROTO_ICMPV6)

def run(proto, host, port, kind, family, many=False):
    if proto == "icmp":
        result = ping6(host)
    elif proto == "tcp":
        result = attempt(tcp, host=host, port=port, kind=socket.SOCK_STREAM)
    else:
        result = attempt(udp_many if many else udp, host=host, port=port)
    results.append({{"proto": proto, "to": host, "port": port, "kind": kind,
                    "family": family, "result": result}})

api = runner._parse_targets(PLAN["api"]) if PLAN["api"] else []
runner._reachable(api)  # (lets the pod learn its gateway's MAC, as the pre-cell check does)
ports = sorted({{p for _, p in api}})
node = runner._node_targets(ports)
iface = "eth0"
for row in open("/proc/net/route").read().splitlines()[1:]:
    if row.split()[1:2] == ["00000000"]:
        iface = row.split()[0]
        break
ipv6 = []
try:
    ipv6 = [l.split()[-1] for l in open("/proc/net/if_inet6") if l.split()[-1] != "lo"]
except OSError:
    pass
jobs = []
for host, port in api:
    jobs.append(("tcp", host, port, "api", "ipv6" if ":" in host else "ipv4"))
for host, port in node:
    jobs.append(("tcp", host, port, "node", "ipv6" if ":" in host else "ipv4"))
for host in PLAN["nodes"]:  # the node's own address: the API port(s) and the kubelet's
    for port in sorted(set(ports) | {{10250}}):
        jobs.append(("tcp", host, port, "node", "ipv6" if ":" in host else "ipv4"))
peer = PLAN["peer"]
for host in peer["ipv4"]:
    for proto in ("tcp", "udp"):
        jobs.append((proto, host, peer["port"], "pod", "ipv4"))
for host in peer["ipv6"]:
    scoped = host + "%" + iface if host.lower().startswith("fe80") else host
    for proto in ("tcp", "udp"):
        jobs.append((proto, scoped, peer["port"], "pod", "ipv6"))
gateways = [h for h, _ in node if ":" not in h]
for host in sorted(set(PLAN["nodes"] + gateways)):
    for port in PLAN["node_ports"]:
        for proto in ("tcp", "udp"):
            jobs.append((proto, host, port, "node port", "ipv4"))
threads = [threading.Thread(target=run, args=job) for job in jobs]
threads.append(threading.Thread(target=run, args=("udp", "ff02::1%" + iface, peer["port"],
                                                  "multicast", "ipv6", True)))
threads.append(threading.Thread(target=run, args=("icmp", "ff02::1%" + iface, 0,
                                                  "multicast", "ipv6")))
threads.append(threading.Thread(target=run, args=("udp", "255.255.255.255", peer["port"],
                                                  "broadcast", "ipv4", True)))
for t in threads:
    t.start()
for t in threads:
    t.join()
print("NETPROBE " + json.dumps({{"ipv6_interfaces": sorted(set(ipv6)), "results": results}}))
"""


def listener_code(seconds: int) -> str:
    """The listener's cell: binds :data:`PORT`, prints ``LISTENING {json}`` (its addresses),
    then for ``seconds`` answers ``pong`` to anything and prints ``CONTACT`` lines."""
    return _LISTENER.format(port=PORT, seconds=seconds)


def prober_code(plan: dict, runner_path: str) -> str:
    """The prober's cell for ``plan`` (``api``: the isolation spec; ``peer``: the listener's
    ``ipv4``/``ipv6``/``port``; ``nodes``: node IPs; ``node_ports``); prints one line
    ``NETPROBE {json}``. ``runner_path``: the runner inside the pod, whose node discovery
    it reuses."""
    return _PROBER.format(plan=json.dumps(plan), runner=runner_path)


def find_json(text: str, tag: str) -> dict | None:
    """The JSON object a probe cell printed after ``tag`` on its stdout (``text``: the
    frames of its log, one per line)."""
    printed = []
    for frame in text.splitlines():
        try:
            fields = json.loads(frame)
        except ValueError:
            continue
        if isinstance(fields, dict) and fields.get("type") == "stream":
            printed.append(str(fields.get("text", "")))
    for line in "".join(printed).splitlines():
        if line.startswith(tag + " "):
            try:
                return json.loads(line[len(tag) + 1 :])
            except ValueError:
                return None
    return None


def reached(result: dict) -> bool:
    """Whether one probe result proves a path (see the module's docstring)."""
    answer = result["result"]
    return answer.startswith("open") or (result["kind"] == "node port" and answer == "refused")


def network_check(probe: dict | None, contacts: list[str], listener: dict | None) -> Check:
    """The "network isolation" check from the prober's ``NETPROBE`` report, the listener's
    ``CONTACT`` lines and its ``LISTENING`` report."""
    name, fix = (
        "network isolation",
        (
            "make the network plugin enforce the deny-all policy for IPv4 and IPv6 (or give"
            " executor pods no IPv6), with no exemption for node ports; see 'The Kubernetes"
            " backend' in the README"
        ),
    )
    if probe is None or listener is None:
        return Check(name, False, "the isolation probe did not report", fix=fix)
    results = probe["results"]
    bad = [r for r in results if reached(r)]
    if bad or contacts:
        shown = [
            f"{r['proto']} {r['kind']} {r['to']}:{r['port']} ({r['family']}): {r['result']}"
            for r in bad
        ] + [f"the listener pod was contacted ({c})" for c in contacts]
        return Check(name, False, "NOT enforced: an executor reached " + "; ".join(shown[:8])
                     + (" (a refusal at a node port is the node answering, or a policy"
                        " enforcer that rejects instead of dropping: either way a reply"
                        " came back)" if any(r["kind"] == "node port" for r in bad) else ""),
                     fix=fix)  # fmt: skip
    families = {r["family"] for r in results}
    kinds = {r["kind"] for r in results}
    missing = [k for k in ("api", "node", "pod", "node port") if k not in kinds]
    if missing or "ipv4" not in families or "ipv6" not in families:
        return Check(name, False, f"probe incomplete (nothing probed: {missing}, families"
                     f" {sorted(families)})", fix=fix)  # fmt: skip
    v6 = probe["ipv6_interfaces"]
    v6_text = f"IPv6 on {', '.join(v6)}, filtered" if v6 else "IPv6 is off in executor pods"
    node_ports = sorted({r["port"] for r in results if r["kind"] == "node port"})
    return Check(
        name,
        True,
        f"enforced: {len(results)} probes (TCP and UDP, IPv4 and IPv6) reached nothing: the"
        " API server, the node, another executor (by address, ff02::1 multicast, broadcast)"
        f" and node ports {', '.join(map(str, node_ports))}; {v6_text}",
    )


def service_node_ports(services: dict) -> list[int]:
    """NodePorts of existing Services (a listing's JSON), to probe where one is known."""
    ports = set()
    for item in services.get("items", []):
        for port in (item.get("spec") or {}).get("ports") or []:
            if isinstance(port.get("nodePort"), int):
                ports.add(port["nodePort"])
    return sorted(ports)[:4]
