"""Escape attempts a hostile cell would make, each asserting the specific way it is stopped.

Most probes run in one cell (``_probes``) whose results the parametrized test reads line by
line; the rest need a cell of their own (they end the sandbox, or look at it from the host).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, stream_text

NOBODY = 65534  # the host user every sandbox ran as, before each had a uid of its own

PROBES = r"""
import ctypes, errno, glob, json, os, socket, subprocess
libc = ctypes.CDLL(None, use_errno=True)
HOST = json.loads(HOST_JSON)
results = {}

def probe(name, fn):
    try:
        results[name] = "ok: " + str(fn())[:200]
    except socket.gaierror as e:
        results[name] = "gaierror"
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e.errno))

def syscall(nr, *args):
    if libc.syscall(nr, *args) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return "allowed"

def connect(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(address)
    return "CONNECTED"

def rewrite(path):  # the same value back: harmless if it works, and proof that it works
    value = open(path).read()
    with open(path, "w") as f:
        f.write(value)
    return "WROTE"

# host secrets
probe("jupyter_runtime", lambda: os.listdir(HOST["runtime_dir"]))
probe("jupyter_config", lambda: os.listdir(HOST["home"] + "/.jupyter"))
probe("crucible_db", lambda: open(HOST["db"], "rb").read(16))
probe("default_db", lambda: open(HOST["default_db"], "rb").read(16))
probe("kubeconfig", lambda: open(HOST["kubeconfig"]).read(16))
probe("kube_dir", lambda: os.listdir(HOST["home"] + "/.kube"))
probe("host_environ", lambda: open(f"/proc/{HOST['pid']}/environ").read())
probe("state_dir", lambda: os.listdir(HOST["state_dir"]))
probe("other_tmp", lambda: glob.glob("/tmp/crucible-*") or open("/tmp/" + HOST["tmp_name"]).read())
probe("sys", lambda: os.listdir("/sys"))
probe("run", lambda: os.listdir("/run"))
probe("dev_disk", lambda: open("/dev/vda", "rb").read(1))
probe("dev_mem", lambda: open("/dev/mem", "rb").read(1))
probe("venv_write", lambda: open(HOST["venv"] + "/evil", "w"))
probe("cgroup_fs", lambda: os.listdir("/sys/fs/cgroup"))
probe("supervisor_frames", lambda: os.open(f"/proc/{os.getppid()}/fd/1", os.O_WRONLY))
# host-wide kernel settings: writable only if the sandbox's user were host root
probe("core_pattern", lambda: rewrite("/proc/sys/kernel/core_pattern"))
probe("overcommit", lambda: rewrite("/proc/sys/vm/overcommit_memory"))
probe("somaxconn", lambda: rewrite("/proc/sys/net/core/somaxconn"))
probe("hostname_sysctl", lambda: rewrite("/proc/sys/kernel/hostname"))
# network
probe("host_jupyter", lambda: connect(socket.AF_INET, ("127.0.0.1", 8888)))
probe("host_postgres", lambda: connect(socket.AF_INET, ("127.0.0.1", 5432)))
probe("host_tcp", lambda: connect(socket.AF_INET, ("127.0.0.1", HOST["tcp_port"])))
probe("metadata", lambda: connect(socket.AF_INET, ("169.254.169.254", 80)))
probe("apiserver", lambda: connect(socket.AF_INET, ("10.96.0.1", 443)))
probe("dns", lambda: socket.getaddrinfo("kubernetes.default.svc.cluster.local", 443))
probe("abstract_unix", lambda: connect(socket.AF_UNIX, "\0" + HOST["abstract"]))
probe("host_unix", lambda: connect(socket.AF_UNIX, HOST["unix_path"]))
probe("postgres_unix", lambda: connect(socket.AF_UNIX, "/var/run/postgresql/.s.PGSQL.5432"))
probe("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
probe("packet_socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
# privilege
probe("setuid_root", lambda: os.setuid(0))
probe("unshare_user", lambda: syscall(272, 0x10000000))
probe("unshare_mount", lambda: syscall(272, 0x00020000))
probe("mount_tmpfs", lambda: syscall(165, b"none", b"/tmp", b"tmpfs", 0, None))
probe("chroot", lambda: syscall(161, b"/tmp"))
attr = ctypes.create_string_buffer(128)
attr[0:8] = (1).to_bytes(4, "little") + (128).to_bytes(4, "little")  # SOFTWARE, size
probe("perf_system_wide", lambda: syscall(298, attr, -1, 0, -1, 0))
# refused by the seccomp filter whatever the arguments
probe("keyctl", lambda: syscall(250, 0, -4, 0))  # KEYCTL_GET_KEYRING_ID, user keyring
probe("add_key", lambda: syscall(248, b"user", b"k", b"v", 1, -3))
probe("io_uring", lambda: syscall(425, 4, ctypes.create_string_buffer(120)))
probe("bpf", lambda: syscall(321, 0, ctypes.create_string_buffer(128), 128))
probe("userfaultfd", lambda: syscall(323, 0))
probe("process_vm_readv", lambda: syscall(310, os.getppid(), None, 0, None, 0, 0))
probe("ptrace_runner", lambda: syscall(101, 16, os.getppid(), None, None))  # PTRACE_ATTACH
probe("x32_abi", lambda: syscall(0x40000000 | 39))  # getpid through the x32 table
probe("setns", lambda: syscall(308, os.open("/proc/self/ns/net", os.O_RDONLY), 0))
init_fd = libc.syscall(434, 1, 0)  # pidfd_open of bubblewrap's init, which holds the pipes
probe("pidfd_getfd", lambda: syscall(438, init_fd, 1, 0))  # ...to the dispatcher
probe("kcmp", lambda: syscall(312, os.getpid(), os.getppid(), 0, 1, 1))  # KCMP_FILE
probe("init_mem", lambda: open("/proc/1/mem", "r+b"))
# the runner (the cell's parent, same user) is not dumpable: its memory, environment and fds
# are out of reach (it could be rewritten to forge frames); the cell's own /proc still works
probe("runner_mem", lambda: open(f"/proc/{os.getppid()}/mem", "r+b"))
probe("runner_environ", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
probe("runner_fds", lambda: os.listdir(f"/proc/{os.getppid()}/fd"))
probe("own_environ", lambda: bool(open("/proc/self/environ", "rb").read()))
def forked_child_environ():  # a forked (not exec'd) child of the cell is readable too
    pid = os.fork()
    if pid == 0:
        __import__("time").sleep(5)
        os._exit(0)
    try:
        return bool(open(f"/proc/{pid}/environ", "rb").read())
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
probe("forked_child_environ", forked_child_environ)
probe("child_environ", lambda: subprocess.run(
    ["sh", "-c", "head -c1 /proc/$$/environ >/dev/null && echo readable"],
    capture_output=True, text=True, timeout=10).stdout.strip())
probe("seccomp", lambda: [l.split()[1] for l in open("/proc/self/status")
                          if l.startswith("Seccomp:")][0])
probe("su", lambda: subprocess.run(["su", "-c", "id"], input="x\n", capture_output=True,
                                   text=True, timeout=10).returncode or "ROOT")
probe("mount_setuid", lambda: subprocess.run(["mount", "-t", "tmpfs", "x", "/tmp"],
                                             capture_output=True, timeout=10).returncode or "MOUNTED")
probe("nosuid", lambda: "nosuid" in open("/proc/self/mountinfo").read().split("\n")[0] or "SUID")
probe("no_new_privs", lambda: [l.split()[1] for l in open("/proc/self/status")
                               if l.startswith("NoNewPrivs")][0])
# socket families: only local, IP (the empty network namespace) and netlink's route protocol
def vsock_listen():  # vsock has no network namespace: the host's (hypervisor's) vsock space
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, 4242))
    s.listen()
    return "LISTENING"
probe("vsock_listen", vsock_listen)
probe("alg_socket", lambda: socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET))
probe("key_socket", lambda: socket.socket(15, socket.SOCK_RAW, 2))  # AF_KEY, PF_KEY_V2
probe("tipc_socket", lambda: socket.socket(30, socket.SOCK_RDM))  # AF_TIPC
probe("netlink_netfilter", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12))
probe("netlink_generic", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16))
probe("netlink_route", lambda: socket.if_nameindex())
def loopback(family, host):  # a cell's own servers on its own loopback still work
    server = socket.socket(family)
    server.bind((host, 0))
    server.listen()
    client = socket.create_connection(server.getsockname()[:2], timeout=3)
    conn, _ = server.accept()
    client.sendall(b"ping")
    return conn.recv(4).decode()
probe("loopback_tcp", lambda: loopback(socket.AF_INET, "127.0.0.1"))
probe("loopback_tcp6", lambda: loopback(socket.AF_INET6, "::1"))
def unix_pair():
    a, b = socket.socketpair()
    a.sendall(b"ping")
    return b.recv(4).decode()
probe("unix_socketpair", unix_pair)
print("RESULTS " + json.dumps(results))
"""

EXPECTED = {
    "jupyter_runtime": "ENOENT",
    "jupyter_config": "ENOENT",
    "crucible_db": "ENOENT",
    "default_db": "ENOENT",
    "kubeconfig": "ENOENT",
    "kube_dir": "ENOENT",
    "host_environ": "ENOENT",
    "state_dir": "ENOENT",
    "other_tmp": "ENOENT",
    "sys": "ENOENT",
    "run": "ENOENT",
    "dev_disk": "ENOENT",
    "dev_mem": "ENOENT",
    "venv_write": "EROFS",
    "cgroup_fs": "ENOENT",
    "supervisor_frames": "EACCES",  # the pipe belongs to the dispatcher's user, not the sandbox
    "core_pattern": "EACCES",
    "overcommit": "EACCES",
    "somaxconn": "EACCES",
    "hostname_sysctl": "EACCES",
    "host_jupyter": "ECONNREFUSED",  # the sandbox's own, empty loopback
    "host_postgres": "ECONNREFUSED",
    "host_tcp": "ECONNREFUSED",
    "metadata": "ENETUNREACH",
    "apiserver": "ENETUNREACH",
    "dns": "gaierror",
    "abstract_unix": "ECONNREFUSED",  # abstract names live in the network namespace
    "host_unix": "ENOENT",
    "postgres_unix": "ENOENT",
    "raw_socket": "EPERM",
    "packet_socket": "EAFNOSUPPORT",  # seccomp; without it EPERM (no CAP_NET_RAW)
    "vsock_listen": "EAFNOSUPPORT",
    "alg_socket": "EAFNOSUPPORT",
    "key_socket": "EAFNOSUPPORT",
    "tipc_socket": "EAFNOSUPPORT",
    "netlink_netfilter": "EPROTONOSUPPORT",
    "netlink_generic": "EPROTONOSUPPORT",
    "netlink_route": "ok: [(1, 'lo')]",
    "loopback_tcp": "ok: ping",
    "loopback_tcp6": "ok: ping",
    "unix_socketpair": "ok: ping",
    "setuid_root": "EINVAL",  # uid 0 does not even exist in the sandbox
    "unshare_user": "EPERM",  # seccomp; without it ENOSPC (max_user_namespaces = 0)
    "unshare_mount": "EPERM",
    "mount_tmpfs": "EPERM",
    "chroot": "EPERM",
    "perf_system_wide": "EPERM",
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "io_uring": "EPERM",
    "bpf": "EPERM",
    "userfaultfd": "EPERM",
    "process_vm_readv": "EPERM",
    "ptrace_runner": "EPERM",
    "x32_abi": "EPERM",
    "setns": "EPERM",
    "pidfd_getfd": "EPERM",
    "kcmp": "EPERM",
    "init_mem": "ENOENT",  # /proc/1 is an empty folder
    "runner_mem": "EACCES",
    "runner_environ": "EACCES",
    "runner_fds": "EACCES",
    "own_environ": "ok: True",
    "child_environ": "ok: readable",
    "forked_child_environ": "ok: True",
    "seccomp": "ok: 2",
    "su": "ok: 1",
    "mount_setuid": "ok: 32",
    "nosuid": "ok: True",
    "no_new_privs": "ok: 1",
}

SECCOMP_PROBES = {
    "unshare_user", "perf_system_wide", "keyctl", "add_key", "io_uring", "bpf",
    "userfaultfd", "process_vm_readv", "ptrace_runner", "x32_abi", "setns", "seccomp",
    "pidfd_getfd", "kcmp", "packet_socket", "vsock_listen", "alg_socket", "key_socket",
    "tipc_socket", "netlink_netfilter", "netlink_generic",
}  # fmt: skip

_results: dict[str, str] = {}


@pytest.fixture
async def probe_results(make_dispatcher, tmp_path) -> dict[str, str]:
    """Run every probe of PROBES in one cell (once per module), with the host's real
    secrets, sockets and servers to aim at."""
    if _results:
        return _results
    from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

    d = await make_dispatcher()
    backend = d.get_backend("local")
    await backend.discover()
    tmp_name = f"crucible-escape-{secrets.token_hex(4)}"
    Path("/tmp", tmp_name).write_text("another sandbox's file")
    unix_path = f"/tmp/{tmp_name}.sock"
    abstract = f"crucible-escape-{secrets.token_hex(4)}"
    servers = []
    for family, address in ((socket.AF_UNIX, unix_path), (socket.AF_UNIX, "\0" + abstract)):
        s = socket.socket(family)
        s.bind(address)
        s.listen()
        servers.append(s)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    servers.append(tcp)
    host = {
        "home": os.path.expanduser("~"),
        "runtime_dir": jupyter_runtime_dir(),
        "db": str(tmp_path / "crucible.db"),
        "default_db": str(Path(jupyter_data_dir(), "crucible", "crucible.db")),
        "kubeconfig": "/var/lib/crucible-cluster/admin.kubeconfig",
        "pid": os.getpid(),
        "state_dir": backend._state_dir,
        "tmp_name": tmp_name,
        "venv": sys.prefix,
        "tcp_port": tcp.getsockname()[1],
        "abstract": abstract,
        "unix_path": unix_path,
    }
    code = PROBES.replace("HOST_JSON", repr(json.dumps(host)))
    try:
        execution, events = await run_cell(d, code, timeout=60)
    finally:
        for s in servers:
            s.close()
        os.unlink(unix_path)
        os.unlink(f"/tmp/{tmp_name}")
    out = stream_text(events, "stdout")
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    _results.update(json.loads(out.split("RESULTS ", 1)[1]))
    return _results


@pytest.mark.parametrize(("probe", "expected"), sorted(EXPECTED.items()))
async def test_escape_attempt_is_stopped(probe_results, probe, expected):
    if probe in SECCOMP_PROBES and platform.machine() != "x86_64":
        pytest.skip("the seccomp filter is written for x86_64 only")
    assert probe_results[probe] == expected


def _sandboxes() -> dict[int, dict[int, tuple[int, str]]]:
    """The sandboxes this test process's dispatchers started, seen from the host: for each
    outermost bubblewrap process, host pid → (real uid, command line) of it and everything
    under it (runners, cells)."""
    info = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        info[int(pid)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]), cmd)

    def tree(top: int) -> set[int]:
        out, grew = {top}, True
        while grew:
            more = {pid for pid, (ppid, _, _) in info.items() if ppid in out} - out
            out |= more
            grew = bool(more)
        return out

    def bwrap(pid: int) -> bool:
        return pid in info and "bwrap" in info[pid][2].split(" ", 1)[0]

    # only the sandboxes: the bubblewrap processes and what runs under them (a browser the
    # session's browser tests keep open is a descendant too, and not a sandbox)
    tops = {pid for pid in tree(os.getpid()) if bwrap(pid) and not bwrap(info[pid][0])}
    return {top: {pid: info[pid][1:] for pid in tree(top) if pid in info} for top in tops}


def _sandbox_processes() -> dict[int, tuple[int, str]]:
    """Host pid → (real uid, command line) of every process of :func:`_sandboxes`."""
    return {pid: p for procs in _sandboxes().values() for pid, p in procs.items()}


def _sandbox_uid_range() -> range:
    from crucible_jupyter.backends.local import uids

    first, last = uids.parse_range(uids.DEFAULT_RANGE)
    return range(first, last + 1)


@pytest.mark.parametrize("warm", [2, 0], ids=["warm", "cold"])
async def test_sandbox_user_is_not_host_root(make_dispatcher, warm):
    """Started by root, bubblewrap mapped the sandbox's user to host root: its writes to
    host-wide /proc/sys files (kernel.core_pattern) went through. Seen from the host, every
    sandbox process must belong to an unprivileged user: as root, one of the sandbox's own
    (per-user kernel limits were shared by every sandbox when all ran as uid 65534)."""
    d = await make_dispatcher(local={"warm_sandboxes": warm})
    cell = "import time\nprint('ready', flush=True)\ntime.sleep(60)"
    executions = [await d.submit({"code": cell}) for _ in range(2)]
    for execution in executions:  # both run at once
        async for event in d.subscribe(execution.id):
            if event.type == "stream" and "ready" in event.data["text"]:
                break
    sandboxes = _sandboxes()
    for execution in executions:
        await d.cancel(execution.id)
    runners = [cmd for p in sandboxes.values() for _, cmd in p.values() if "runner" in cmd]
    assert len(runners) >= 4, sandboxes  # two runners and their cells (and warm ones)
    users = [{uid for uid, _ in procs.values()} for procs in sandboxes.values()]
    assert all(len(u) == 1 for u in users), sandboxes  # one user per sandbox
    users = [u.pop() for u in users]
    if os.geteuid() == 0:
        assert len(set(users)) == len(users) >= 2, sandboxes  # a host uid of its own each
        assert all(uid in _sandbox_uid_range() for uid in users), users
    else:
        assert set(users) == {os.geteuid()}


DAEMON = textwrap.dedent("""
    import os, signal, subprocess
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # keeps the cell's stdout open, and escapes its session
            os.execvp("sleep", ["sleep", "{marker}"])
        os._exit(0)
    subprocess.Popen(["sleep", "{marker}"], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("spawned", flush=True)
""")


def _alive(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\0" + marker.encode() + b"\0":
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("warm", [2, 0], ids=["warm", "cold"])
async def test_daemonized_processes_end_with_the_cell(make_dispatcher, warm):
    d = await make_dispatcher(local={"warm_sandboxes": warm})
    marker = f"{3000 + secrets.randbelow(1000)}.{secrets.randbelow(1000)}"
    execution, events = await run_cell(d, DAEMON.format(marker=marker), timeout=30)
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert stream_text(events, "stdout") == "spawned\n"
    for _ in range(100):  # the sandbox is gone once the execution is finished; allow reaping
        if not _alive(marker):
            break
        await asyncio.sleep(0.05)
    assert _alive(marker) == []


async def test_kill_everything_ends_only_the_sandbox(dispatcher):
    """``kill -9 -1`` reaches the sandbox's own processes, not the host's (not even those of
    the user the sandbox runs as)."""
    host = subprocess.Popen(
        ["sleep", "60"],
        **({"user": NOBODY, "group": NOBODY} if os.geteuid() == 0 else {}),
    )
    try:
        code = "import os, signal\nprint('bye', flush=True)\nos.kill(-1, signal.SIGKILL)"
        execution, _ = await run_cell(dispatcher, code)
        assert execution.status is Status.FAILED
        # the runner was killed before it could report how the cell ended: all that is known
        # is the sandbox's exit code (bubblewrap's 128+9), which a cell can choose too
        assert execution.reason == "exited with code 137"
        assert host.poll() is None
    finally:
        host.kill()
        host.wait()


async def test_forged_frames_do_not_change_the_status(dispatcher):
    code = textwrap.dedent("""
        import os, sys
        forged = '{"v":1,"seq":1,"t":0,"type":"end","exit_code":0}'
        print(forged, flush=True)
        os.write(1, b'{"type":"status","status":"succeeded"}\\n')
        sys.stdout.flush()
        os._exit(3)
    """)
    execution, events = await run_cell(dispatcher, code)
    assert execution.status is Status.FAILED
    assert execution.exit_code == 3
    assert execution.reason == "exited with code 3"
    assert '"type":"end"' in stream_text(events, "stdout")  # shown as text, not obeyed


async def test_stopped_supervisor_and_flood_still_time_out(make_dispatcher):
    """A cell that freezes its runner, or floods stdout and never lets it read stdin, is still
    ended by the wall-clock timeout."""
    d = await make_dispatcher(output_limit=1 << 20)
    stop = "import os, signal, time\nos.kill(os.getppid(), signal.SIGSTOP)\ntime.sleep(60)"
    flood = "import os\nwhile True:\n    os.write(1, b'x' * 65536)"
    results = await asyncio.gather(*(run_cell(d, c, timeout=2) for c in (stop, flood)))
    assert [e.status for e, _ in results] == [Status.TIMED_OUT, Status.TIMED_OUT]


async def test_cpu_quota_holds_with_several_processes(dispatcher):
    """Two busy processes for 1.5 s of wall time get at most about cpu × 1.5 s of CPU.
    (Without the quota they would get up to 3 s on two cores; a busy machine only lowers it.)"""
    code = textwrap.dedent("""
        import os, time
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    pass
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        print("cpu", os.times().children_user + os.times().children_system)
    """)
    execution, events = await run_cell(dispatcher, code, cpu=0.2, timeout=60)
    assert execution.status is Status.SUCCEEDED, execution.reason
    used = float(stream_text(events, "stdout").split()[1])
    assert used < 0.2 * 1.5 + 0.4, used


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm"])
async def test_filling_memory_backed_folders_counts_as_memory(dispatcher, where):
    code = f"with open('{where}/fill', 'wb') as f:\n    for _ in range(250):\n" + (
        "        f.write(b'x' * (1 << 20))"
    )
    execution, _ = await run_cell(dispatcher, code, memory="128Mi", timeout=30)
    assert execution.status is Status.FAILED
    assert execution.reason.startswith("memory limit exceeded"), execution.reason


async def test_nothing_of_a_cell_reaches_the_next(make_dispatcher):
    """Warm sandboxes: a later cell sees no file, process or environment of an earlier one."""
    d = await make_dispatcher(local={"warm_sandboxes": 2})
    first = (
        "import os\nopen('/tmp/left', 'w').write('x')\nos.environ['LEFT'] = '1'\nprint(os.getpid())"
    )
    await run_cell(d, first)
    later = "import os\nprint('left' in os.listdir('/tmp'), os.environ.get('LEFT'))"
    for _ in range(3):  # the third runs in a sandbox started after the first cell ended
        execution, events = await run_cell(d, later)
        assert stream_text(events, "stdout") == "False None\n"


async def test_error_frames_do_not_pass_the_output_limit_without_end(make_dispatcher):
    """Errors pass the output limit (the one that names the failure must show), but a cell can
    send any number of error frames, or displays of a dict holding ``"type":"error"``: neither
    may carry more than a bounded amount past the limit into the database."""
    d = await make_dispatcher(output_limit=64 << 10)
    code = textwrap.dedent("""
        import sys
        for i in range(40):
            sys.stdout._channel.send({"type": "error", "ename": "E", "evalue": "e" * 60000,
                                      "traceback": []})
            display({"application/json": {"type": "error"}, "text/plain": "d" * 60000}, raw=True)
        raise ValueError("the real one")
    """)
    execution, events = await run_cell(d, code, timeout=60)
    stored = await d.events(execution.id)
    kept = sum(len(json.dumps(e.data)) for e in stored)
    assert kept < (64 << 10) + (1 << 20) + (64 << 10), kept  # limit + error room + notices
    assert execution.truncated
    assert execution.dropped_bytes > 3 << 20
    assert execution.reason == "ValueError: the real one"


async def test_dev_holds_no_more_than_tmp_without_a_memory_cgroup(make_dispatcher):
    """Without a memory cgroup (rlimits only), files in memory-backed folders are not counted
    as the cell's memory: /dev (a tmpfs of half the host's RAM) and /dev/shm in it let a cell
    hold that much RAM. /dev/shm is a tmpfs of ``tmp_size``, /dev is read-only."""
    d = await make_dispatcher(local={"use_cgroups": False, "tmp_size": 16 << 20})
    code = textwrap.dedent("""
        import errno
        def fill(prefix):
            written = 0
            try:
                for i in range(4):
                    with open(f"{prefix}{i}", "wb") as f:
                        for _ in range(16):
                            f.write(b"x" * (1 << 20))
                            written += 1
            except OSError as e:
                return f"{errno.errorcode[e.errno]} after {written} MiB"
            return f"{written} MiB"
        print(fill("/dev/shm/fill"))
        print(fill("/dev/fill"))
    """)
    execution, events = await run_cell(d, code, memory="128Mi", timeout=60)
    assert execution.status is Status.SUCCEEDED, (execution.reason, stream_text(events))
    shm, dev = stream_text(events, "stdout").splitlines()
    assert shm.startswith("ENOSPC after "), shm
    assert int(shm.split()[2]) <= 16, shm
    assert dev == "EROFS after 0 MiB"


TAKEOVER = textwrap.dedent("""
    import os, subprocess, time
    subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
    try:  # bubblewrap's init (pid 1) waits in wait4: the code after that call becomes
        # setsid(); prctl(PR_SET_PDEATHSIG, 0); for (;;) pause();
        pc = int(open("/proc/1/syscall").read().split()[-1], 16)
        with open("/proc/1/mem", "r+b", buffering=0) as mem:
            mem.seek(pc)
            mem.write(bytes.fromhex("b8700000000f05bf0100000031f6b89d0000000f05b8220000000f05ebf7"))
        if os.fork() == 0:  # an orphan that ends wakes the init up into that code
            if os.fork() == 0:
                time.sleep(0.2)
            os._exit(0)
        print("took over the init", flush=True)
    except OSError as e:
        print("init out of reach:", type(e).__name__, flush=True)
    time.sleep(60)
""")


def _kill_sandbox_of(pid: int) -> None:
    """SIGKILL the bubblewrap init above ``pid`` (its whole pid namespace ends with it)."""
    while pid > 1:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = dict(
                ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
        except OSError:
            return
        if cmd.startswith(b"/usr/bin/bwrap") or b"bwrap\0" in cmd[:64]:
            os.kill(pid, 9)
            return
        pid = int(fields["PPid"])


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 machine code")
async def test_cell_cannot_take_over_the_sandbox_init(make_dispatcher):
    """Without a cgroup, the sandbox ends when bubblewrap's init (pid 1 inside) dies: killed
    with bubblewrap's process group, or by its parent-death signal. A cell that rewrote the
    init's code through /proc/1/mem (same user) left both, outlived the timeout with every
    process it started, and held the dispatcher's pipes open: the execution never ended."""
    d = await make_dispatcher(local={"use_cgroups": False})
    marker = f"{3000 + secrets.randbelow(1000)}.{secrets.randbelow(1000)}"
    try:
        execution, events = await asyncio.wait_for(
            run_cell(d, TAKEOVER.format(marker=marker), timeout=3), 30
        )
        assert stream_text(events, "stdout") == "init out of reach: FileNotFoundError\n"
        assert execution.status is Status.TIMED_OUT
        for _ in range(100):
            if not _alive(marker):
                break
            await asyncio.sleep(0.05)
        assert _alive(marker) == []
    finally:
        for pid in _alive(marker):
            _kill_sandbox_of(pid)


async def test_no_sandbox_starts_when_its_binds_would_show_secrets(
    make_dispatcher, tmp_path, monkeypatch
):
    """A Python whose prefix holds the home folder (``./configure --prefix=$HOME``), or an
    extra bind of it, would show cells the Jupyter server's tokens, the history database,
    ~/.ssh: the execution fails with the reason and the fix, nothing runs, nothing warm."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("SECRET")
    monkeypatch.setenv("HOME", str(home))
    d = await make_dispatcher(local={"extra_ro_binds": [str(home)]})
    execution, events = await run_cell(d, f"print(open({str(home / '.ssh/id_ed25519')!r}).read())")
    assert execution.status is Status.FAILED
    assert "cells would see secrets" in execution.reason
    assert str(home) in execution.reason
    assert "own folder" in execution.reason  # says how to fix it
    assert "SECRET" not in stream_text(events)
    backend = d.get_backend("local")
    assert not backend.warm_pool.ready
    assert not backend.warm_pool.starting
    for inside in (home / ".ssh", home / ".local/share/jupyter/crucible"):  # not only above
        inside.mkdir(parents=True, exist_ok=True)
        other = await make_dispatcher(local={"extra_ro_binds": [str(inside)]})
        refused, _ = await run_cell(other, "print(1)")
        assert "cells would see secrets" in refused.reason, (inside, refused)
    checks = {c.name: c for c in await backend.checks()}
    assert not checks["secrets"].ok
    assert "own folder" in checks["secrets"].fix


TCP_FLOOD = textwrap.dedent("""
    import errno, socket, time
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)
    held, conns, stopped = 0, [], "target reached"
    try:
        while held < {target} and len(conns) < 200:
            client = socket.create_connection(server.getsockname())
            conns.append((client, server.accept()[0]))  # the receiver never reads
            client.setblocking(False)
            while True:
                try:
                    held += client.send(b"x" * 65536)
                except BlockingIOError:
                    break
    except OSError as e:
        stopped = errno.errorcode.get(e.errno, str(e))
    print("queued", held >> 20, "MiB in", len(conns), "connections:", stopped, flush=True)
    time.sleep(60)
""")


def _host_tcp_pages() -> int:
    """The host's TCP memory (all network namespaces), in pages: /proc/net/sockstat."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    raise AssertionError("no TCP line in /proc/net/sockstat")


@pytest.mark.parametrize(
    ("warm", "memory", "cap"),
    [(2, "64Mi", None), (0, "64Mi", None), (0, "1Gi", 32 << 20)],
    ids=["warm", "cold", "capped"],
)
async def test_socket_buffers_count_against_the_memory_limit(make_dispatcher, warm, memory, cap):
    """A cell with 64 MiB queued 400 MiB in loopback TCP buffers (receivers that never read):
    under cgroup v1 socket memory is charged to the cell only with a kmem TCP limit, and host
    TCP memory grew by 412 MiB (600 such connections starve every TCP socket on the host).
    Host TCP memory may not grow by more than twice the cell's socket-buffer limit: its memory
    limit, or ``socket_buffer_limit`` if lower (a big cell could fill host TCP memory)."""
    local = {"warm_sandboxes": warm, **({"socket_buffer_limit": cap} if cap else {})}
    d = await make_dispatcher(local=local)
    layout, _ = d.get_backend("local").cgroup_layout
    if layout is None:
        pytest.skip("no cgroup here: memory is limited by RLIMIT_AS, sockets are not counted")
    from crucible_jupyter.models import parse_bytes

    limit = min(parse_bytes(memory), cap or 64 << 20)
    before = _host_tcp_pages()
    execution = await d.submit(
        {"code": TCP_FLOOD.format(target=400 << 20), "memory": memory, "timeout": 120}
    )
    said = ""
    async for event in d.subscribe(execution.id):
        if event.type == "stream":
            said += event.data["text"]
            if "queued" in said:
                break
    during = _host_tcp_pages()
    await d.cancel(execution.id)
    grown = (during - before) * os.sysconf("SC_PAGE_SIZE")
    assert grown < 2 * limit, (said, grown >> 20)


CONNECTION_FLOOD = textwrap.dedent("""
    import errno, os, socket, time
    r, w = os.pipe()
    for n in range({procs}):  # fds are per process: 400 connections (800 fds) in each
        if os.fork() == 0:
            family, host = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")][n % 2]
            conns, stopped = [], "ok"
            try:
                server = socket.socket(family)
                server.bind((host, 0))
                server.listen(512)
                for _ in range(400):
                    client = socket.create_connection(server.getsockname()[:2])
                    conns.append((client, server.accept()[0]))  # never read
                    client.setblocking(False)
                    try:
                        while True:
                            client.send(b"x" * 65536)
                    except BlockingIOError:
                        pass
            except OSError as e:
                stopped = errno.errorcode.get(e.errno, str(e))
            os.write(w, f"{{len(conns)}} {{stopped}}\\n".encode())
            time.sleep(120)
            os._exit(0)
    os.close(w)  # a child that died (the OOM killer) then ends the reading
    held, why = 0, set()
    with os.fdopen(r) as f:
        for _ in range({procs}):
            n, stopped = (f.readline() or "0 child-lost").split()
            held, why = held + int(n), why | {{stopped}}
    print("held", held, "connections:", *sorted(why), flush=True)
    time.sleep(120)
""")


def _host_socket_pages() -> int:
    """The host's TCP (IPv4 and IPv6: one pool) and UDP memory, in pages: /proc/net/sockstat."""
    pages = 0
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        fields = line.split()
        if fields[0] in ("TCP:", "UDP:"):
            pages += int(fields[fields.index("mem") + 1])
    return pages


@pytest.mark.parametrize(
    ("warm", "memory", "cap"), [(2, "64Mi", 256 << 20), (0, "1Gi", None)], ids=["warm", "cold-big"]
)
async def test_many_connections_do_not_grow_host_tcp_memory_past_the_limit(
    make_dispatcher, warm, memory, cap
):
    """Past a group's TCP limit the kernel still force-charges about one buffer to each
    socket: a 1 GiB cell (TCP limit 64 MiB) held 984 MiB of host TCP memory in 11,520 loopback
    connections whose receivers never read, a 64 MiB cell 267 MiB in 2,900. The sandbox's IP
    sockets are capped (sockcap.py, scaled to its TCP limit): a cell trying 4,000 connections
    over IPv4 and IPv6 gets EPERM, and host socket memory grows by less than twice its limit.
    The warm sandbox started with a 256 MiB socket limit (its warm group's memory): its cap
    must follow the cell's 64 MiB when it is handed the cell."""
    local = {"warm_sandboxes": warm, **({"socket_buffer_limit": cap} if cap else {})}
    d = await make_dispatcher(local=local)
    layout, detail = d.get_backend("local").cgroup_layout
    if layout is None or layout.socket_cap is None:
        pytest.skip(f"no IP-socket cap here (it needs root and a cgroup2 hierarchy): {detail}")
    from crucible_jupyter.models import parse_bytes

    limit = min(parse_bytes(memory), cap or 64 << 20)  # 64 MiB: socket_buffer_limit's default
    before = _host_socket_pages()
    code = CONNECTION_FLOOD.format(procs=10)
    execution = await d.submit({"code": code, "memory": memory, "timeout": 300})
    said = ""
    async for event in d.subscribe(execution.id):
        if event.type == "stream":
            said += event.data["text"]
            if "held" in said:
                break
    during = _host_socket_pages()
    await d.cancel(execution.id)
    assert "EPERM" in said, said  # the cap stopped it, not something else
    grown = (during - before) * os.sysconf("SC_PAGE_SIZE")
    assert grown < 2 * limit, (said, grown >> 20)


def _start_in(group, script: str) -> subprocess.Popen:
    """A real process that has joined every controller of ``group`` (as the launcher does
    before it starts a sandbox) and runs ``script`` (sh)."""
    joins = "".join(f'echo $$ > "{f}" && ' for f in group.procs_files())
    proc = subprocess.Popen(["/bin/sh", "-c", f"{joins}exec /bin/sh -c '{script}'"])

    def joined_all() -> bool:
        for f in group.procs_files():
            with open(f) as fh:
                if str(proc.pid) not in fh.read().split():
                    return False
        return True

    for _ in range(500):  # joining takes a few ms
        if joined_all():
            return proc
        assert proc.poll() is None, "the process could not join the group"
        time.sleep(0.01)
    raise AssertionError("the process did not join the group")


@pytest.fixture
def cgroup():
    """A real per-execution cgroup of the local backend's layout (removed afterwards)."""
    from crucible_jupyter.backends.local import cgroups

    layout, detail = cgroups.probe()
    if layout is None:
        pytest.skip(f"no usable cgroups here: {detail}")
    group = cgroups.Group.create(
        layout, f"test-kill-{secrets.token_hex(4)}", memory=256 << 20, cpu=1.0, pids=512
    )
    yield group
    group.remove()


def test_group_kill_signals_no_pid_that_left_the_group(cgroup):
    """Under cgroup v1 a kill reads cgroup.procs, then signals each pid: a pid that ended in
    between and went to a host process was killed by the root dispatcher. A read that is
    stale by the time it is acted on (a host process's pid in it) must spare that process."""
    from crucible_jupyter.backends.local import cgroups

    inside = _start_in(cgroup, "sleep 60")
    outsider = subprocess.Popen(["sleep", "60"])  # has the pid the stale read names

    class StaleRead(cgroups.Group):
        """cgroup.procs as read just before its pid was reused by a host process."""

        def pids(self) -> list[int]:
            return [*super().pids(), outsider.pid]

    stale = StaleRead(cgroup.layout, os.path.basename(cgroup.dirs["memory"]))
    try:
        stale.kill()
        assert inside.wait(timeout=30) == -9
        assert outsider.poll() is None, "a process outside the group was killed"
    finally:
        for proc in (inside, outsider):
            proc.kill()
            proc.wait()


def test_group_kill_ends_a_forking_tree(cgroup):
    """The pidfd path still kills a tree that keeps forking while it is being killed."""
    bomb = _start_in(cgroup, "while :; do sleep 60 & done")
    try:
        for _ in range(500):
            if len(cgroup.pids()) > 50:
                break
            time.sleep(0.01)
        assert len(cgroup.pids()) > 50
        for _ in range(3000):  # killed processes take a moment to exit (bounded: 30 s)
            cgroup.kill()
            if not cgroup.pids():
                break
            time.sleep(0.01)
        assert cgroup.pids() == []
        assert bomb.wait(timeout=30) == -9
    finally:
        bomb.kill()
        bomb.wait()


@pytest.mark.parametrize("warm", [2, 0], ids=["warm", "cold"])
@pytest.mark.parametrize(
    ("code", "exit_code", "reason"),
    [
        ("raise SystemExit(125)", 125, "exited with code 125"),  # was "could not place..."
        ("raise SystemExit(137)", 137, "exited with code 137"),  # was "killed by SIGKILL"
        ("import os\nos._exit(137)", 137, "exited with code 137"),
        ("import os\nos._exit(139)", 139, "exited with code 139"),
        # a real signal, seen by the runner in the cell's wait status
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 137, "killed by SIGKILL"),
        ("import ctypes\nctypes.string_at(0)", 139, "killed by SIGSEGV"),
    ],
    ids=["exit125", "exit137", "_exit137", "_exit139", "sigkill", "sigsegv"],
)
async def test_a_cell_cannot_forge_a_reason(make_dispatcher, warm, code, exit_code, reason):
    """An exit code is only an exit code: infrastructure failures (the cgroup placement) and
    signals are known from what the cell cannot write (the launcher's report, a wait status)."""
    d = await make_dispatcher(local={"warm_sandboxes": warm})
    execution, events = await run_cell(d, code)
    assert execution.status is Status.FAILED
    assert (execution.exit_code, execution.reason) == (exit_code, reason), stream_text(events)


def test_uid_leases_are_exclusive_across_processes(tmp_path):
    """Two dispatchers on one host lease from the same folder: a uid another process holds is
    never handed out, and it is free again once that process is gone (however it ended)."""
    from crucible_jupyter.backends.local import uids
    from crucible_jupyter.errors import Unavailable

    leases = uids.UidLeases(3_000_000_000, 3_000_000_002, str(tmp_path))
    holder = subprocess.Popen(  # another dispatcher, holding the first uid of the range
        [sys.executable, "-c", "import sys; sys.path[:0] = sys.argv[1:2]\n"
         "from crucible_jupyter.backends.local import uids\n"
         f"lease = uids.UidLeases(3_000_000_000, 3_000_000_002, {str(tmp_path)!r}).take()\n"
         "print(lease.uid, flush=True); sys.stdin.read()",
         str(Path(__file__).resolve().parents[2])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "3000000000"
        mine = [leases.take(), leases.take()]
        assert [lease.uid for lease in mine] == [3_000_000_001, 3_000_000_002]
        with pytest.raises(Unavailable, match="uid_range"):
            leases.take()
        mine[0].release()
        assert leases.take().uid == 3_000_000_001
    finally:
        holder.kill()
        holder.communicate()  # waits, and closes its pipes
    assert leases.take().uid == 3_000_000_000  # the killed holder's lease ended with it


PER_USER = textwrap.dedent("""
    import ctypes, errno, os, time
    libc = ctypes.CDLL(None, use_errno=True)

    def count(make, most):  # how many could be made, and why no more
        made = 0
        while made < most:
            if make(made) < 0:
                return made, errno.errorcode.get(ctypes.get_errno(), "?")
            made += 1
        return made, "ok"

    def mqueue(i):  # unlinked at once: it counts while open, and is gone with the process
        name = f"/crucible-test-{{os.getpid()}}-{{i}}".encode()
        fd = libc.mq_open(name, 0o102, 0o600, None)  # O_RDWR | O_CREAT
        if fd >= 0:
            libc.mq_unlink(name)
        return fd

    inotify = lambda i: libc.inotify_init1(0)
    fanotify = lambda i: libc.fanotify_init(0x200, 0)  # FAN_REPORT_FID: allowed unprivileged
    MOST = {most}
    print("inotify", *count(inotify, MOST), "mqueue", *count(mqueue, MOST),
          "fanotify", *count(fanotify, MOST), flush=True)
    if MOST > 1:
        time.sleep(60)
""")


def _counts(line: str) -> dict[str, tuple[int, str]]:
    words = line.split()
    return {words[i]: (int(words[i + 1]), words[i + 2]) for i in range(0, len(words), 3)}


@pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes have uids of their own only as root")
@pytest.mark.parametrize("warm", [2, 0], ids=["warm", "cold"])
async def test_per_user_kernel_limits_are_not_shared(make_dispatcher, warm):
    """Inotify instances, message-queue bytes and fanotify groups are limited per user: while
    all sandboxes ran as host uid 65534, one cell holding its 128 inotify instances made every
    other sandbox, and the host's processes of that uid, get EMFILE. With a host uid of its
    own each, a cell exhausting them leaves another sandbox and the host's users theirs."""
    d = await make_dispatcher(local={"warm_sandboxes": warm})
    hog = await d.submit({"code": PER_USER.format(most=100_000), "timeout": 120})
    said = ""
    async for event in d.subscribe(hog.id):
        if event.type == "stream":
            said += event.data["text"]
            if said.endswith("\n"):
                break
    try:
        held = _counts(said)
        assert held["inotify"] == (
            int(Path("/proc/sys/fs/inotify/max_user_instances").read_text()),
            "EMFILE",
        ), held
        assert held["mqueue"][1] == "EMFILE", held
        assert held["mqueue"][0] >= 1, held
        other, events = await run_cell(d, PER_USER.format(most=1))
        assert other.status is Status.SUCCEEDED, (other.reason, stream_text(events))
        theirs = _counts(stream_text(events, "stdout"))
        host = subprocess.run(
            ["/usr/bin/python3", "-I", "-c", PER_USER.format(most=1)],
            user=NOBODY, group=NOBODY, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        await d.cancel(hog.id)
    assert theirs["inotify"] == theirs["mqueue"] == (1, "ok"), theirs
    assert _counts(host.stdout)["inotify"] == _counts(host.stdout)["mqueue"] == (1, "ok"), host
    if held["fanotify"][0] > 0:  # permitted to unprivileged users on this kernel
        assert held["fanotify"][1] == "EMFILE", held
        assert theirs["fanotify"] == _counts(host.stdout)["fanotify"] == (1, "ok"), theirs
