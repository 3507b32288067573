"""What ``crucible doctor`` reports for the Kubernetes backend: the cluster reachable, the
deny-all NetworkPolicy present, the warm pods, the seccomp profile, and — run for real in
executor pods (see ``probes.py``) — network isolation and the process limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING

from ...errors import CrucibleError
from ...models import Execution, ExecutionRequest, Resources, new_execution_id
from ..base import Check, Outcome, Sandbox
from . import objects, probes

if TYPE_CHECKING:
    from .backend import CrucibleKubernetesBackend

#: Threads the doctor probe tries to start; a pod that stops short of it has a process limit.
PIDS_PROBE = 1500


async def checks(backend: CrucibleKubernetesBackend) -> list[Check]:
    """Cluster reachable, namespace usable, NetworkPolicy present, warm pods, seccomp
    profile, and what executor pods probed (network isolation, process limit)."""
    out = []
    cluster = backend.cluster
    try:
        await cluster.connect()
        out.append(Check("kubernetes", True, f"API reachable; namespace {cluster.namespace!r}"))
    except CrucibleError as e:
        return [
            Check(
                "kubernetes",
                False,
                e.message,
                fix="start the cluster (dev/cluster/cluster up) and set KUBECONFIG",
            )
        ]
    try:
        await cluster.network_policy()
        out.append(Check("network policy", True, f"{objects.POLICY_NAME} present"))
    except Exception as e:  # noqa: BLE001 -- reported as it is
        out.append(Check("network policy", False, f"deny-all policy missing: {e}"))
    out.append(_pool_check(backend))
    out.append(_seccomp_check(backend.seccomp_profile))
    out.extend(await _probe_executor(backend))
    return out


def _seccomp_check(profile: str) -> Check:
    """Which seccomp profile executors run (the probe below starts one with it)."""
    if profile:
        return Check(
            "seccomp profile",
            True,
            f"executors run Localhost profile {profile!r} (io_uring, ptrace,"
            " vsock and other socket families refused)",
            fix="if executors cannot be created, install"
            " crucible_jupyter/backends/kubernetes/seccomp-executor.json on every node as"
            f" <kubelet root-dir>/seccomp/{profile}",
        )
    return Check(
        "seccomp profile",
        False,
        "executors run the runtime's default profile (RuntimeDefault), which allows"
        " io_uring (and vsock in containerd 1.6)",
        fix="install crucible's profile on the nodes and set"
        " c.CrucibleKubernetesBackend.seccomp_profile (see the README)",
        severity="warning",
    )


def _pool_check(backend: CrucibleKubernetesBackend) -> Check:
    """The warm pods: configured, and those in the namespace (warm, starting, busy)."""
    pool = backend.warm_pool()
    problem = pool.problem
    detail = pool.report() + (f"; the last did not become warm: {problem}" if problem else "")
    if backend.warm_pods <= 0:
        detail += "; every cell starts a Job"
    return Check(
        "warm pods",
        problem is None,
        detail,
        fix="see the warm pod's log: kubectl -n NAMESPACE logs -l crucible.jupyter.org/pool",
        severity="warning",
    )


async def _probe_executor(backend: CrucibleKubernetesBackend) -> list[Check]:
    """Run real executors (see ``probes.py``): a listener, and a prober that tries to
    reach the API server, the node (IPv4, IPv6), the listener (IPv4, IPv6, multicast,
    broadcast) and node ports, and counts the threads it can start (does the kubelet
    set podPidsLimit?)."""
    target = backend.isolation_target() or backend.cluster.api_endpoint  # (even when "off")
    if not target:
        return [
            Check(
                "network isolation",
                False,
                "no address to probe (API server unknown, or isolation_probe = 'off')",
                fix="set c.CrucibleKubernetesBackend.isolation_probe = 'HOST:PORT'",
            )
        ]
    resources = Resources(0.2, 256 << 20)
    listener = Execution(
        id=new_execution_id(),
        request=ExecutionRequest(code=probes.listener_code(90), timeout=120,
                                 resources=resources),
        user="crucible-doctor",
    )  # fmt: skip
    lines: list[bytes] = []
    listening = asyncio.Event()

    async def follow(sandbox: Sandbox) -> None:
        async for _, line, _ in sandbox.lines():
            lines.append(line)
            if b"LISTENING" in line:
                listening.set()

    try:
        sandbox = await backend.start(listener)
    except CrucibleError as e:
        return [Check("network isolation", False, f"probe could not run: {e.message}")]
    following = asyncio.ensure_future(follow(sandbox))
    try:
        await asyncio.wait(
            {following, asyncio.ensure_future(listening.wait())},
            timeout=90,
            return_when=asyncio.FIRST_COMPLETED,
        )
        text = b"\n".join(lines).decode("utf-8", "replace")
        peer = probes.find_json(text, "LISTENING")
        if peer is None:
            outcome = await sandbox.wait() if following.done() else None
            if "IsolationError" in text:
                return [_network_check(text, outcome, target)]
            why = (outcome and outcome.reason) or text[-300:] or "no output"
            return [Check("network isolation", False, f"probe listener failed: {why}")]
        pod = backend.cluster.pods.pod_for(objects.label_value(listener.id))
        status = (pod or {}).get("status") or {}
        nodes = [ip for ip in [status.get("hostIP")] if ip]
        for ip in [status.get("podIP")] + [a.get("ip") for a in status.get("podIPs") or []]:
            family = "ipv6" if ip and ":" in ip else "ipv4"
            if ip and ip not in peer[family]:
                peer[family].append(ip)
        node_ports = list(probes.NODE_PORTS)
        with contextlib.suppress(Exception):  # only more ports to try
            node_ports += probes.service_node_ports(await backend.cluster.services())
        plan = {"api": target, "peer": peer, "nodes": nodes, "node_ports": node_ports}
        code = probes.prober_code(plan, f"{objects.MOUNT}/runner.py") + _threads_code()
        prober = Execution(
            id=new_execution_id(),
            request=ExecutionRequest(code=code, timeout=90, resources=resources),
            user="crucible-doctor",
        )
        try:
            probe_box = await backend.start(prober)
            out = b"\n".join([line async for _, line, _ in probe_box.lines()]).decode()
            outcome = await probe_box.wait()
        except CrucibleError as e:
            return [Check("network isolation", False, f"probe could not run: {e.message}")]
    finally:
        with contextlib.suppress(Exception):
            await sandbox.kill()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(following, 10)
        with contextlib.suppress(Exception):
            await sandbox.wait()
    text = b"\n".join(lines).decode("utf-8", "replace")
    contacts = re.findall(r"CONTACT (tcp|udp) ([0-9a-fA-F.:]+)", text)
    if "IsolationError" in out:
        check = _network_check(out, outcome, target)
    elif (report := probes.find_json(out, "NETPROBE")) is None:
        reason = outcome.reason or out[-300:] or "no output"
        check = Check("network isolation", False, f"probe failed: {reason}")
    else:
        check = probes.network_check(report, [" from ".join(c) for c in contacts], peer)
    return [check, _pids_check(out)]


def _threads_code() -> str:
    """Cell code printing ``THREADS n``: how many threads an executor can start (up to
    PIDS_PROBE, then lets them go). The pod's limit (podPidsLimit) sits on the pod's cgroup,
    which a container cannot read."""
    return (
        "\nimport threading\n"
        "threading.stack_size(65536)\n"
        "stop, started = threading.Event(), []\n"
        "try:\n"
        f"    for _ in range({PIDS_PROBE}):\n"
        "        t = threading.Thread(target=stop.wait)\n"
        "        t.start()\n"
        "        started.append(t)\n"
        "except RuntimeError:\n"
        "    pass\n"
        "stop.set()\n"
        "for t in started:\n"
        "    t.join()\n"
        "print('THREADS', len(started))\n"
    )


def _network_check(text: str, outcome: Outcome | None, target: str) -> Check:
    if "IsolationError" in text:
        return Check(
            "network isolation",
            False,
            f"NOT enforced: an executor pod could still reach {target} or the node"
            f" (its runner refused to run the cell: {text[-300:]})",
            fix="run a NetworkPolicy enforcer (a CNI with policy support, or kube-router)",
        )
    why = (outcome and outcome.reason) or text[-200:]
    return Check("network isolation", False, f"probe failed: {why}")


def _pids_check(text: str) -> Check:
    found = re.search(r"THREADS (\d+)", text)
    if found and int(found.group(1)) < PIDS_PROBE:
        return Check(
            "process limit",
            True,
            f"an executor pod stops at {found.group(1)} threads (the kubelet's podPidsLimit)",
        )
    return Check(
        "process limit",
        False,
        f"executor pods have no process limit (a probe started {PIDS_PROBE} threads): a fork"
        " or thread bomb is stopped only by the memory limit, after it has slowed the node"
        if found
        else "the executor pod's process limit could not be measured",
        fix="set podPidsLimit (e.g. 1024) in the kubelet configuration of the nodes",
    )
