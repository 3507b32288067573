"""Escape attempts from an executor pod on the real dev cluster, each asserting how it is
stopped. Most probes run in one cell whose results the parametrized test reads."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from urllib.parse import urlparse

import pytest

from crucible_jupyter.backends.kubernetes.objects import job_name
from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, stream_text

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
    # the Service CIDR is routed to the bridge and kube-proxy rewrites 10.96.0.1:443 to the
    # API server, whose packets the policy rejects (a pass would connect, not refuse)
    "service_ip": "ECONNREFUSED",
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
        code = PROBES.replace("API_ADDRESS", repr(_api_server(kube.kubeconfig)))
        execution, events = await run_cell(d, code, timeout=120)
        assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
        _results.update(json.loads(stream_text(events, "stdout").split("RESULTS ", 1)[1]))
    return _results


@pytest.mark.parametrize(("probe", "expected"), sorted(EXPECTED.items()))
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


# ----- issue 13: node disk, per-user limits, seccomp, what the cold path carries --------------


def _pod_log_bytes(namespace: str, job: str) -> int | None:
    """Bytes of the pod's log files on the node (the kubelet's /var/log/pods, this machine),
    rotated ones included; None once the pod is gone."""
    folders = list(Path("/var/log/pods").glob(f"{namespace}_{job}-*"))
    if not folders:
        return None
    return sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())


async def test_an_output_flood_leaves_at_most_the_output_limit_on_the_node(k8s, kube, namespace):
    """40 s of base64 to stdout wrote 2.6 GB of pod logs on the node's disk while 10 MiB was
    kept. The runner stops writing at the output limit; the pod has an ephemeral-storage
    limit besides."""
    import asyncio

    limit = 1 << 20
    d = await k8s(dispatcher={"output_limit": limit})
    code = textwrap.dedent("""
        import base64, os, sys, time
        chunk = base64.b64encode(os.urandom(3 << 18)).decode()  # 1 MiB of base64
        end = time.monotonic() + 8
        while time.monotonic() < end:
            sys.stdout.write(chunk)
            os.write(1, chunk.encode())
        raise ValueError("flood over")
    """)
    execution = await d.submit({"code": code, "timeout": 120})
    job = job_name(execution.id)
    largest = 0
    while (await d.get(execution.id)).status not in (Status.SUCCEEDED, Status.FAILED):
        size = _pod_log_bytes(namespace, job)
        largest = max(largest, size or 0)
        await asyncio.sleep(0.3)
    final = await d.wait(execution.id)
    largest = max(largest, _pod_log_bytes(namespace, job) or 0)
    print(f"pod log on the node: at most {largest:,} bytes; dropped {final.dropped_bytes:,}")
    assert final.reason == "ValueError: flood over", final.reason
    assert final.truncated
    assert final.dropped_bytes > 50 << 20  # it did flood
    # the limit, the frame that crossed it, the error, ~40 bytes of prefix per log line
    assert 0 < largest < limit + (1 << 20), largest


def test_executor_pods_carry_an_ephemeral_storage_limit():
    from crucible_jupyter.backends.kubernetes.backend import CrucibleKubernetesBackend
    from crucible_jupyter.models import Resources

    job = CrucibleKubernetesBackend().make_job("x", {}, "img", Resources(1, 1 << 29), 60, {})
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["ephemeral-storage"] == str(40 << 20)
    assert "--output-limit" not in container["command"]  # (no dispatcher: no limit known)


async def test_the_termination_message_file_cannot_be_written(k8s):
    """/dev/termination-log was a 0666 file on the node's disk, outside every limit: a cell
    wrote 256 MiB into it. It is now under /root, which the pod's user cannot enter."""
    d = await k8s()
    code = textwrap.dedent("""
        import errno
        for path in ("/dev/termination-log", "/root/.crucible-termination-log"):
            try:
                with open(path, "ab") as f:
                    for _ in range(256):
                        f.write(b"x" * (1 << 20))
                print(path, "WROTE")
            except OSError as e:
                print(path, errno.errorcode[e.errno])
    """)
    execution, events = await run_cell(d, code, timeout=60)
    out = stream_text(events, "stdout")
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    assert "WROTE" not in out, out
    assert "/dev/termination-log ENOENT" in out or "/dev/termination-log EACCES" in out, out
    assert "/root/.crucible-termination-log EACCES" in out, out


HOLD_PER_USER_LIMITS = """
import ctypes, errno, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
held = {"inotify": 0, "mqueue": 0}
failed = {}
for _ in range(HOW_MANY):
    if libc.inotify_init1(0) < 0:
        failed["inotify"] = errno.errorcode[ctypes.get_errno()]
        break
    held["inotify"] += 1
for i in range(HOW_MANY):
    name = f"/crucible-{os.getpid()}-{i}".encode()
    if libc.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, None) < 0:
        failed["mqueue"] = errno.errorcode[ctypes.get_errno()]
        break
    libc.mq_unlink(name)  # counted while open; gone with the process
    held["mqueue"] += 1
print("uid", os.getuid(), "held", held, "failed", failed, flush=True)
time.sleep(HOLD_SECONDS)
"""


async def test_executions_do_not_share_per_user_kernel_limits(k8s):
    """Every pod ran as uid 65534: one cell holding 128 inotify instances and its POSIX
    message queues made every other executor on the node get EMFILE. Each pod has a uid of
    its own now."""
    d = await k8s()
    hog = HOLD_PER_USER_LIMITS.replace("HOW_MANY", "1000").replace("HOLD_SECONDS", "600")
    holder = await d.submit({"code": hog, "timeout": 300})
    async for event in d.subscribe(holder.id):
        if event.type == "stream" and "held" in event.data["text"]:
            held = event.data["text"]
            break
    # it exhausted its user's limits
    assert "'inotify': 'EMFILE'" in held, held
    assert "'mqueue': 'EMFILE'" in held, held
    one = HOLD_PER_USER_LIMITS.replace("HOW_MANY", "1").replace("HOLD_SECONDS", "0")
    other, events = await run_cell(d, one, timeout=120)
    await d.cancel(holder.id)
    out = stream_text(events, "stdout")
    assert other.status is Status.SUCCEEDED, (other.reason, stream_text(events))
    assert "held {'inotify': 1, 'mqueue': 1} failed {}" in out, out
    uids = {int(re.search(r"uid (\d+)", text).group(1)) for text in (held, out)}
    assert len(uids) == 2, uids
    assert all(1_000_000_000 <= u <= 1_000_065_535 for u in uids), uids


SECCOMP_PROBES = r"""
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
results = {}

def probe(name, fn):
    try:
        results[name] = "ok: " + str(fn())[:100]
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e.errno))

def syscall(nr, *args):
    if libc.syscall(nr, *args) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return "allowed"

probe("vsock", lambda: socket.socket(40, socket.SOCK_STREAM).close())
probe("io_uring_setup", lambda: syscall(425, 1, ctypes.byref(ctypes.create_string_buffer(120))))
def seize_a_child():
    child = os.fork()
    if child == 0:
        os.pause()
    try:
        return syscall(101, 0x4206, child, 0, 0)  # PTRACE_SEIZE
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)

probe("ptrace", seize_a_child)
probe("process_vm_readv", lambda: syscall(310, os.getpid(), 0, 0, 0, 0, 0))
probe("keyctl", lambda: syscall(250, 0, -3, 0))
probe("bpf", lambda: syscall(321, 0, 0, 0))
probe("userfaultfd", lambda: syscall(323, 0))
probe("packet", lambda: socket.socket(17, socket.SOCK_RAW))
probe("netlink_netfilter", lambda: socket.socket(16, socket.SOCK_RAW, 12))
probe("tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
probe("tcp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
probe("unix_pair", lambda: [s.close() for s in socket.socketpair()])
probe("netlink_route", lambda: len(socket.if_nameindex()) > 0)
print("RESULTS " + json.dumps(results))
"""


async def test_the_executor_seccomp_profile_refuses_vsock_io_uring_and_tracing(k8s):
    """socket(AF_VSOCK) and io_uring_setup were allowed by the runtime's default profile.
    Executors run crucible's own profile (the runtime default's allow-list minus what the
    local sandbox refuses, sockets of the UNIX, IP and netlink-route families only)."""
    d = await k8s()
    execution, events = await run_cell(d, SECCOMP_PROBES, timeout=60)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    results = json.loads(stream_text(events, "stdout").split("RESULTS ", 1)[1])
    assert results == {
        "vsock": "EPERM",
        "io_uring_setup": "EPERM",
        "ptrace": "EPERM",
        "process_vm_readv": "EPERM",
        "keyctl": "EPERM",
        "bpf": "EPERM",
        "userfaultfd": "EPERM",
        "packet": "EPERM",
        "netlink_netfilter": "EPERM",
        "tcp": "ok: None",
        "tcp6": "ok: None",
        "unix_pair": "ok: [None, None]",
        "netlink_route": "ok: True",
    }


async def test_a_normal_cell_runs_under_the_seccomp_profile(k8s):
    d = await k8s()
    code = textwrap.dedent("""
        import subprocess, sys, threading, multiprocessing, tempfile
        import numpy as np
        a = np.random.default_rng(0).random((300, 300))
        print("numpy", (a @ a).shape == (300, 300))
        print(subprocess.run([sys.executable, "-c", "print('child')"],
                             capture_output=True, text=True).stdout.strip())
        out = []
        threads = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("threads", sorted(out) == list(range(8)))
        with multiprocessing.Pool(2) as pool:
            print("pool", pool.map(abs, [-1, -2]))
        with tempfile.NamedTemporaryFile() as f:
            print("tmp", f.name.startswith("/tmp/"))
        import getpass  # the pod's uid has no passwd entry: USER says who it is
        print("user", getpass.getuser())
    """)
    execution, events = await run_cell(d, code, image="ml", timeout=120)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    assert stream_text(events, "stdout").split() == [
        "numpy", "True", "child", "threads", "True", "pool", "[1,", "2]", "tmp", "True",
        "user", "crucible",
    ]  # fmt: skip


async def test_a_cell_too_large_for_the_cold_path_is_refused_when_submitted(k8s):
    """A 1,040,021-byte cell (under max_code_bytes) was accepted, then refused by Kubernetes
    (cell and runner exceed the ConfigMap's 1 MiB). It is refused at submit now, with the
    limit; a cell of exactly the limit runs, even made of control characters (6 bytes each
    as a JSON string)."""
    from crucible_jupyter.errors import RequestTooLarge

    d = await k8s()
    room = d.get_backend("kubernetes").max_code_bytes()
    assert 900_000 < room < 1 << 20
    head, tail = "x = '", "'\nprint(len(x), x.count(chr(1)))\n"
    fill = room - len(head) - len(tail)
    code = head + "\x01" * (fill // 2) + "a" * (fill - fill // 2) + tail
    assert len(code.encode()) == room
    execution, events = await run_cell(d, code, timeout=120)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    assert stream_text(events, "stdout") == f"{fill} {fill // 2}\n"
    with pytest.raises(RequestTooLarge) as refused:
        await d.submit({"code": code + "#"})
    assert f"limit of {room:,} bytes" in refused.value.message
    assert refused.value.status_code == 413


async def test_hostile_bytes_on_the_event_pipe_do_not_kill_the_runner(k8s):
    """`[` x 200000 on the event pipe killed the supervisor with RecursionError."""
    d = await k8s()
    code = textwrap.dedent("""
        import fcntl, os
        for fd in map(int, os.listdir('/proc/self/fd')):
            try:
                writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
            except OSError:
                continue
            if fd > 2 and writable:
                os.write(fd, b'[' * 200000 + b'\\n')
        print('still fine')
    """)
    execution, events = await run_cell(d, code, timeout=60)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    assert stream_text(events, "stdout") == "still fine\n"
    assert stream_text(events, "stderr") == "[" * 200000 + "\n"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("raise SystemExit(125)", "exited with code 125"),
        ("raise SystemExit(137)", "exited with code 137"),
        ("import os; os._exit(139)", "exited with code 139"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
    ],
)
async def test_a_cell_cannot_forge_a_reason_with_its_exit_code(k8s, code, reason):
    """An exit code alone is "exited with code N": `SystemExit(137)` was read as "killed by
    SIGKILL". A real signal is known from the runner, which saw the cell's wait status."""
    d = await k8s()
    execution, events = await run_cell(d, code, timeout=60)
    assert execution.status is Status.FAILED
    assert execution.reason == reason, stream_text(events)
