"""Escape attempts from an executor pod on the real dev cluster, each asserting how it is
stopped. Most probes run in one cell whose results the parametrized test reads."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest
from engine.conftest import run_cell, stream_text

from crucible_jupyter.models import Status

pytestmark = pytest.mark.k8s

PROBES = r"""
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
API_HOST, API_PORT = API_ADDRESS
results = {}

def probe(name, fn):
    try:
        results[name] = "ok: " + str(fn())[:200]
    except socket.gaierror:
        results[name] = "gaierror"
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e.errno))

def connect(host, port):
    socket.create_connection((host, port), timeout=3).close()
    return "CONNECTED"

def syscall(nr, *args):
    if libc.syscall(nr, *args) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return "allowed"

def status(key):
    return [l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":")][0]

probe("sa_token", lambda: os.listdir("/var/run/secrets/kubernetes.io/serviceaccount"))
probe("pid1", lambda: "runner" in open("/proc/1/cmdline").read())
probe("other_pods", lambda: len([p for p in os.listdir("/proc") if p.isdigit()]) <= 3)
probe("configmap", lambda: sorted(f for f in os.listdir("/opt/crucible") if not f.startswith("..")))
probe("write_root", lambda: open("/evil", "w"))
probe("write_opt", lambda: open("/opt/crucible/evil", "w"))
probe("write_usr", lambda: open("/usr/evil", "w"))
probe("proc_sys", lambda: open("/proc/sys/kernel/core_pattern", "w"))
probe("cgroup_limit", lambda: open("/sys/fs/cgroup/memory/memory.limit_in_bytes", "w"))
probe("tmp_is_memory", lambda: os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize)
probe("service_ip", lambda: connect(os.environ.get("KUBERNETES_SERVICE_HOST", "10.96.0.1"), 443))
probe("api_server", lambda: connect(API_HOST, API_PORT))
probe("kubelet", lambda: connect(API_HOST, 10250))
probe("metadata", lambda: connect("169.254.169.254", 80))
probe("dns", lambda: socket.getaddrinfo("kubernetes.default.svc.cluster.local", 443))
probe("unshare_user", lambda: syscall(272, 0x10000000))
probe("setuid_root", lambda: os.setuid(0))
probe("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
probe("no_new_privs", lambda: status("NoNewPrivs"))
probe("seccomp", lambda: status("Seccomp"))
probe("capabilities", lambda: status("CapEff"))
print("RESULTS " + json.dumps(results))
"""

EXPECTED = {
    "sa_token": "ENOENT",
    "pid1": "ok: True",  # its own pid namespace: pid 1 is the runner
    "other_pods": "ok: True",
    "configmap": "ok: ['cell.py', 'runner.py']",  # only its own execution's ConfigMap
    "write_root": "EROFS",
    "write_opt": "EROFS",
    "write_usr": "EROFS",
    "proc_sys": "EROFS",
    "cgroup_limit": "EROFS",
    "tmp_is_memory": f"ok: {256 << 20}",  # a tmpfs of exactly the size limit
    # the deny-all NetworkPolicy, as kube-router enforces it (reject: unreachable/refused)
    "service_ip": "ENETUNREACH",
    "api_server": "ECONNREFUSED",
    "kubelet": "ECONNREFUSED",
    "metadata": "ENETUNREACH",
    "dns": "gaierror",
    "unshare_user": "EPERM",  # seccomp RuntimeDefault
    "setuid_root": "EPERM",
    "raw_socket": "EPERM",
    "no_new_privs": "ok: 1",
    "seccomp": "ok: 2",
    "capabilities": "ok: 0000000000000000",
}

_results: dict[str, str] = {}


def _api_server(kubeconfig: str) -> tuple[str, int]:
    server = re.search(r"server:\s*(\S+)", Path(kubeconfig).read_text()).group(1)
    url = urlparse(server)
    return url.hostname, url.port or 443


@pytest.fixture
async def probe_results(k8s, kube) -> dict[str, str]:
    if not _results:
        d = await k8s()
        code = PROBES.replace("API_ADDRESS", repr(_api_server(kube["kubeconfig"])))
        execution, events = await run_cell(d, code, timeout=120)
        assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
        _results.update(json.loads(stream_text(events, "stdout").split("RESULTS ", 1)[1]))
    return _results


@pytest.mark.parametrize("probe,expected", sorted(EXPECTED.items()))
async def test_escape_attempt_is_stopped(probe_results, probe, expected):
    assert probe_results[probe] == expected


async def test_tmp_cannot_grow_past_its_limit(k8s):
    """An emptyDir on disk was only measured by the kubelet's periodic eviction: a cell wrote
    800 MiB into a 256 MiB /tmp (and could fill the node's disk first). In memory it is a tmpfs
    of the limit's size, counted toward the pod's memory."""
    d = await k8s()
    code = textwrap.dedent("""
        import os
        written = 0
        try:
            for i in range(4):
                with open(f"/tmp/fill{i}", "wb") as f:
                    for _ in range(200):
                        f.write(b"x" * (1 << 20))
                        written += 1
        except OSError as e:
            print("stopped", e.strerror)
        print("written", written)
    """)
    execution, events = await run_cell(d, code, memory="768Mi", timeout=120)
    assert execution.status is Status.SUCCEEDED, execution.reason
    out = stream_text(events, "stdout")
    assert "stopped No space left on device" in out, out
    assert int(out.split("written ")[1]) <= 256
