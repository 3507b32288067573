"""Run each execution in a local bubblewrap sandbox (the embedded default).

Isolation, when bubblewrap works: every namespace unshared (no network at all, not even
the host's loopback; own pids, IPC, UTS, user), a read-only minimal root (``/usr`` and the
Python installation only), a private size-limited ``/tmp``, no host home directories or
secrets, ``--new-session``, ``--die-with-parent``, all capabilities dropped, no nested user
namespaces, a seccomp filter (x86_64) against rarely needed kernel interfaces and socket
families; started as a host uid of the sandbox's own when crucible runs as root (never as
host root; see uids.py). Memory (socket buffers included), process-count and CPU limits come
from a per-execution cgroup when the machine allows it, from rlimits otherwise; file size and
open files from rlimits. As root, the cgroup also caps the sandbox's IP sockets (sockcap.py):
past any TCP limit each socket still gets a buffer, so only that cap bounds host TCP memory.

Where bubblewrap is missing or broken, executions run as a plain subprocess with limits,
a loud warning is logged once, and ``isolation`` is recorded as ``"none"`` on each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from traitlets import Bool, Integer, List, TraitError, Unicode, default, validate

from ..errors import InvalidRequest, Unavailable
from ..models import Execution, ExecutionRequest, format_bytes
from . import cgroups, uids
from .base import FRAMES, STDERR, Backend, Check, Outcome, Sandbox, read_lines, reported_signal

RUNNER = Path(__file__).resolve().parent.parent / "runner.py"
SANDBOX_DIR = "/opt/crucible"
SANDBOX_UID = 65534
#: Scratch folders are ``<tmp>/crucible-local-<pid>-<random>``.
STATE_PREFIX = "crucible-local-"
#: The runner's end frame (it may carry the signal that ended the cell).
END_FRAME = re.compile(rb'\{"v":1,"seq":\d+,"t":\d+,"type":"end"[,}]')
#: Longest wait, once the sandbox has exited, for its last frames to be read (normally none).
END_FRAME_WAIT = 10.0
#: Memory limit of a warm sandbox until it is handed a cell (then: the cell's limit).
WARM_MEMORY = 256 << 20
PASSWD = "sandbox:x:65534:65534:crucible sandbox:/tmp:/usr/sbin/nologin\n"
GROUP = "sandbox:x:65534:\n"
EXPOSURE_FIX = (
    "run crucible with a Python installed in its own folder (a venv such as"
    " python3 -m venv ~/crucible-venv, or /usr/bin/python3) or set"
    " c.CrucibleLocalBackend.python; keep extra_ro_binds to folders without secrets"
)
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives", "/etc/fonts")
#: When crucible runs as root, bubblewrap is started as a host uid of the sandbox's own (from
#: ``uid_range``, see uids.py) instead: bubblewrap started by root maps the sandbox's user to
#: host root, whose writes to host-wide /proc/sys files (kernel.core_pattern: a command the
#: kernel runs as root) are allowed. Inside, the cell is uid 65534 whatever its host uid.
#: Per-uid rlimits of that uid: processes (above ``max_processes``, so that the cgroup, which
#: names the cause, refuses first; the only process limit where no cgroup can be had) and
#: POSIX message-queue bytes (the kernel's default is 800 KiB).
MSGQUEUE_BYTES = 256 << 10
#: Runs as root in a private mount namespace before bubblewrap: binds the folders the sandbox
#: needs where uid 65534 can reach them (a Python under /root), says so in the launch report
#: (a file, or -), then drops to that uid. ``$0`` uid, ``$1`` report, ``$2`` bind count.
STAGE_SCRIPT = (
    'r=$1; n=$2; shift 2; while [ "$n" -gt 0 ]; do mount --bind "$1" "$2" || exit 125; shift 2;'
    ' n=$((n - 1)); done; [ "$r" = - ] || echo staged >> "$r" || exit 125;'
    ' exec setpriv --reuid=$0 --regid=$0 --clear-groups -- "$@"'
)
#: Joins the execution's cgroup(s) (``$CRUCIBLE_CGROUP_PROCS``), says so in the launch report
#: (file ``$1``), then runs the rest. The cell cannot reach the report: its own exit code 125
#: is only an exit code.
PLACE_SCRIPT = (
    'for f in $CRUCIBLE_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done;'
    ' unset CRUCIBLE_CGROUP_PROCS; echo placed >> "$1" || exit 125; shift; exec "$@"'
)


#: Syscalls a cell never needs that widen the kernel's attack surface (as Docker's default
#: profile refuses them): keyrings, io_uring, eBPF, userfaultfd, perf events, tracing or
#: reading other processes or taking their file descriptors (the cell's own runner, the
#: sandbox's init and the dispatcher's pipes it holds), module/kexec loading, mounting and
#: namespaces. x86_64 numbers; they fail with
#: EPERM, as do every i386 and x32 system call.
SECCOMP_DENY_X86_64 = {
    "add_key": 248, "request_key": 249, "keyctl": 250,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "bpf": 321, "userfaultfd": 323, "perf_event_open": 298,
    "process_vm_readv": 310, "process_vm_writev": 311, "ptrace": 101,
    "pidfd_getfd": 438, "kcmp": 312, "process_madvise": 440,
    "kexec_load": 246, "kexec_file_load": 320,
    "init_module": 175, "finit_module": 313, "delete_module": 176,
    "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442, "acct": 163, "swapon": 167, "swapoff": 168,
    "reboot": 169, "syslog": 103, "quotactl": 179, "lookup_dcookie": 212,
}  # fmt: skip


#: Socket address families a cell may open (``socket``, ``socketpair``): local and IP sockets,
#: which the sandbox's empty network namespace confines, and netlink for NETLINK_ROUTE only
#: (glibc's if_nameindex and getifaddrs read the sandbox's own interfaces through it: without
#: it socket.if_nameindex failed with EAFNOSUPPORT, getaddrinfo worked either way; the cell
#: has no capability to change anything there). Every other family fails with EAFNOSUPPORT,
#: as if the kernel had none: vsock has no network namespace (a cell took a port in the
#: host's vsock space and could reach the hypervisor); packet, key, alg (the kernel's crypto
#: API), bluetooth, xdp, tipc, rds and the rest are kernel code a cell never needs. Other
#: netlink protocols (netfilter, generic, audit, ...) fail with EPROTONOSUPPORT.
SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
AF_NETLINK, NETLINK_ROUTE = 16, 0
SOCKET_CALLS_X86_64 = {"socket": 41, "socketpair": 53}


def seccomp_program() -> bytes | None:
    """The classic-BPF seccomp filter bubblewrap installs (``--seccomp``) before it runs
    the runner; None where it is not written for this architecture (x86_64 only).

    Written by hand rather than with libseccomp: it is about sixty instructions built once,
    while libseccomp's Python binding comes as a system package bound to the system's Python
    (crucible's own environment could not import it) or as a ctypes wrapper of the native
    library: a dependency bigger than the program. Each rule is checked against the real
    kernel by the escape tests (tests/engine/test_escape.py)."""
    if platform.machine() != "x86_64":
        return None
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, |JGE|K, BPF_RET
    errno_ = 0x00050000  # SECCOMP_RET_ERRNO | errno
    returns = {
        "allow": 0x7FFF0000,  # SECCOMP_RET_ALLOW
        "deny": errno_ | 1,  # EPERM
        "no_family": errno_ | 97,  # EAFNOSUPPORT
        "no_protocol": errno_ | 93,  # EPROTONOSUPPORT
    }
    arg0, arg2 = 16, 32  # low halves (little-endian) of args[0] and args[2] in seccomp_data
    # (code, jump if true, jump if false, k): a jump is 0 (next) or a label; a label is a str
    prog: list = [
        (ld, 0, 0, 4),  # arch
        (jeq, 0, "deny", 0xC000003E),  # AUDIT_ARCH_X86_64, else the i386 ABI
        (ld, 0, 0, 0),  # syscall number
        (jge, "deny", 0, 0x40000000),  # the x32 ABI
        *((jeq, "sockets", 0, nr) for nr in SOCKET_CALLS_X86_64.values()),
        *((jeq, "deny", 0, nr) for nr in sorted(SECCOMP_DENY_X86_64.values())),
        (ret, 0, 0, returns["allow"]),
        "sockets",
        (ld, 0, 0, arg0),  # the address family (an int: the kernel reads the low half only)
        *((jeq, "allow", 0, af) for af in SOCKET_FAMILIES.values()),
        (jeq, 0, "no_family", AF_NETLINK),
        (ld, 0, 0, arg2),  # the netlink protocol
        (jeq, "allow", "no_protocol", NETLINK_ROUTE),
    ]
    for name, value in returns.items():
        prog += [name, (ret, 0, 0, value)]
    where, n = {}, 0
    for insn in prog:
        if isinstance(insn, str):
            where[insn] = n
        else:
            n += 1
    out: list[bytes] = []
    for insn in filter(lambda i: not isinstance(i, str), prog):
        code, jt, jf, k = insn
        jt, jf = (where[j] - len(out) - 1 if isinstance(j, str) else j for j in (jt, jf))
        out.append(struct.pack("=HBBI", code, jt, jf, k))
    return b"".join(out)


class CrucibleLocalBackend(Backend):
    """Runs executions on this machine, each in its own bubblewrap sandbox."""

    name = "local"

    bwrap = Unicode(
        help="Path of the bubblewrap executable; empty to look for `bwrap` on PATH.",
    ).tag(config=True)

    python = Unicode(
        help="""Python interpreter that runs cells inside the sandbox. Defaults to the
        interpreter running crucible, so cells see the same installed packages (read-only).""",
    ).tag(config=True)

    @default("python")
    def _default_python(self) -> str:
        return sys.executable

    allow_unisolated = Bool(
        True,
        help="""When bubblewrap is unavailable, run cells as plain subprocesses with limits
        (recorded as isolation "none", with a loud warning). Set False to refuse instead.""",
    ).tag(config=True)

    tmp_size = Integer(
        256 << 20,
        help="Size limit of the private /tmp of each sandbox, in bytes (and of its /dev/shm).",
    ).tag(config=True)

    max_processes = Integer(
        256, help="Most processes and threads one execution may have at once (cgroup pids.max)."
    ).tag(config=True)

    max_file_size = Integer(
        256 << 20, help="Largest file one execution may write, in bytes (RLIMIT_FSIZE)."
    ).tag(config=True)

    max_open_files = Integer(1024, help="Most open files per process (RLIMIT_NOFILE).").tag(
        config=True
    )

    max_line_bytes = Integer(
        16 << 20, help="Longest single frame accepted from the runner; longer ones are cut."
    ).tag(config=True)

    extra_ro_binds = List(
        Unicode(),
        help="Extra host paths to expose read-only inside every sandbox (e.g. a data set).",
    ).tag(config=True)

    use_cgroups = Bool(
        True, help="Use per-execution cgroups for memory, pids and CPU when available."
    ).tag(config=True)

    socket_buffer_limit = Integer(
        64 << 20,
        help="""Most TCP socket-buffer memory one execution may hold, in bytes (at most its
        memory limit), under cgroup v1 (memory.kmem.tcp.limit_in_bytes; cgroup v2 counts
        socket buffers as the cell's memory instead). All a cell can reach is its own
        loopback, so a full buffer only makes a sender wait; host TCP memory is shared by
        every socket on the host (net.ipv4.tcp_mem), which an 8 GiB cell could fill. Past
        this limit the kernel still gives each socket about one buffer, so where eBPF can
        be attached (root) the sandbox's IPv4/IPv6 sockets are also capped at this limit
        over 128 KiB (512 for 64 MiB, at least 32; socket() then fails with EPERM): raise
        this limit for cells that need more sockets at once.""",
    ).tag(config=True)

    uid_range = Unicode(
        uids.DEFAULT_RANGE,
        help="""Host uids for sandboxes, "FIRST-LAST", when crucible runs as root: each
        running sandbox (warm ones too) runs as one of its own, so per-user kernel limits
        (inotify instances, message-queue bytes, fanotify groups, processes) are not shared
        between sandboxes or with the host's users. No user of the host may have a uid in it.
        The default lies between the ranges systemd gives to containers and to its "foreign"
        uids. Not root: every sandbox runs as crucible's own user (see `crucible doctor`).""",
    ).tag(config=True)

    @validate("uid_range")
    def _check_uid_range(self, proposal: Any) -> str:
        try:
            uids.parse_range(proposal["value"])
        except ValueError as e:
            raise TraitError(f"{e}, e.g. {uids.DEFAULT_RANGE!r}") from None
        return proposal["value"]

    uid_lock_dir = Unicode(
        uids.DEFAULT_FOLDER,
        help="""Folder of the lock files that lease the uids of ``uid_range`` host-wide (every
        dispatcher on the host must use the same one).""",
    ).tag(config=True)

    warm_sandboxes = Integer(
        2,
        help="""Sandboxes kept started and waiting for a cell, so a cell skips the start-up of
        bubblewrap and Python (most of its latency). Each still runs exactly one cell and is
        then discarded, like any other; it gets that cell's limits, environment and code
        when it is handed the cell. 0 starts every sandbox on demand.""",
    ).tag(config=True)

    _warned = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._warm: list[_Warm] = []
        self._warming: set[asyncio.Task] = set()
        self._procs: weakref.WeakSet[asyncio.subprocess.Process] = weakref.WeakSet()
        self._closed = False

    # ----- discovery (cached, done once) -------------------------------------------------

    @cached_property
    def bwrap_path(self) -> str | None:
        """The bubblewrap executable, or None."""
        return self.bwrap or shutil.which("bwrap")

    @cached_property
    def bwrap_problem(self) -> str | None:
        """None when bubblewrap works here; otherwise what went wrong when trying it."""
        if not self.bwrap_path:
            return "bubblewrap (bwrap) is not installed"
        if self._as_root:
            missing = [t for t in ("unshare", "setpriv", "prlimit", "mount") if not shutil.which(t)]
            if missing:
                return (
                    f"crucible runs as root and needs {', '.join(missing)} (util-linux) to start"
                    " bubblewrap as a uid of the sandbox's own: started by root, a sandbox's"
                    " user would be host root"
                )
        try:
            probe = subprocess.run(
                [  # as root, as the range's first uid without a lease: `true` for a moment
                    *self._drop_argv([], uid=self._uid_leases.first),
                    self.bwrap_path,
                    "--unshare-all",
                    "--unshare-user",
                    "--die-with-parent",
                    "--ro-bind",
                    "/",
                    "/",
                    "--cap-drop",
                    "ALL",
                    "true",
                ],
                capture_output=True,
                timeout=20,
                text=True,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"bubblewrap could not start: {e}"
        if probe.returncode != 0:
            return f"bubblewrap cannot create namespaces here: {probe.stderr.strip()}"
        return None

    @cached_property
    def cgroup_layout(self) -> tuple[cgroups.Layout | None, str]:
        """The cgroup layout in use (None → rlimits only) and a description of it."""
        if not self.use_cgroups:
            return None, "disabled by configuration (CrucibleLocalBackend.use_cgroups)"
        return cgroups.probe()

    @cached_property
    def python_paths(self) -> list[str]:
        """Host folders the sandboxed interpreter needs: its prefixes, read-only."""
        out = subprocess.run(
            [
                self.python,
                "-I",
                "-c",
                "import sys, os; print(os.path.realpath(sys.executable)); print(sys.prefix);"
                " print(sys.base_prefix); print(sys.exec_prefix)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split("\n")
        paths = {str(Path(out[0]).parent.parent), *out[1:4]}
        return sorted(p for p in paths if p and not p.startswith("/usr"))

    @cached_property
    def exposed_secrets(self) -> list[str]:
        """Folders with secrets that the read-only binds (``python_paths``, ``extra_ro_binds``)
        would show to cells: the home folder itself, the Jupyter runtime folder (server
        tokens) and data folder (the history database), ``~/.ssh``, ``~/.kube``. A Python
        installed with its prefix in the home folder (or at ``/``) would expose them all."""
        from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

        home = Path.home().resolve()
        folders = [Path(jupyter_runtime_dir()), Path(jupyter_data_dir()), home / ".ssh"]
        folders = [p.resolve() for p in [*folders, home / ".kube"]]
        exposed = []
        for bound in [*self.python_paths, *self.extra_ro_binds]:
            top = Path(bound).resolve()
            # the home folder when the bind holds it (a venv inside it is fine); a secret
            # folder when the bind holds it or lies inside it
            hit = home if top == home or top in home.parents else None
            hit = hit or next(
                (p for p in folders if p == top or top in p.parents or p in top.parents), None
            )
            if hit is not None:
                exposed.append(f"{bound} (holds {hit})" if top != hit else bound)
        return exposed

    def _exposure_problem(self) -> str | None:
        """Why sandboxes must not start with these binds, or None."""
        if not self.exposed_secrets:
            return None
        bound = ", ".join(self.exposed_secrets)
        return f"cells would see secrets: the folders bound into every sandbox include {bound}"

    @cached_property
    def _as_root(self) -> bool:
        """True when crucible runs as root: each sandbox is then started as a host uid of its
        own, from ``uid_range``."""
        return os.geteuid() == 0

    @cached_property
    def _uid_leases(self) -> uids.UidLeases:
        """The host uids of sandboxes (as root), leased host-wide: see uids.py."""
        first, last = uids.parse_range(self.uid_range)
        return uids.UidLeases(first, last, self.uid_lock_dir)

    def _take_uid(self, isolated: bool) -> uids.Lease | None:
        """A host uid for one isolated sandbox, when crucible runs as root (None otherwise)."""
        return self._uid_leases.take() if isolated and self._as_root else None

    @cached_property
    def _state_dir(self) -> str:
        d = tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-")
        os.chmod(d, 0o755)  # bubblewrap may run as a sandbox's uid; nothing secret in here
        Path(d, "passwd").write_text(PASSWD)
        Path(d, "group").write_text(GROUP)
        return d

    @cached_property
    def _binds(self) -> list[tuple[str, str]]:
        """``(source, destination)`` of the extra read-only binds (the Python installation,
        ``extra_ro_binds``). As root, each source is a stand-in in the state folder that the
        launcher binds the real folder onto in a private mount namespace: uid 65534 may not
        be able to reach the real one (a Python under /root)."""
        paths = [*self.python_paths, *self.extra_ro_binds]
        if not self._as_root:
            return [(p, p) for p in paths]
        stage = Path(self._state_dir, "binds")
        stage.mkdir(mode=0o755, exist_ok=True)
        out = []
        for i, path in enumerate(paths):
            spot = stage / str(i)
            if os.path.isdir(path):
                spot.mkdir(mode=0o755, exist_ok=True)
            else:
                spot.touch(mode=0o644)
            out.append((str(spot), path))
        return out

    def _drop_argv(
        self,
        binds: list[tuple[str, str]],
        report: _LaunchReport | None = None,
        uid: int | None = None,
    ) -> list[str]:
        """As root: the launcher that binds ``binds`` (stand-in ← real folder) in a private
        mount namespace, reports it in ``report`` and starts what follows as host ``uid``
        (the sandbox's own), with low per-uid rlimits. Empty otherwise."""
        if not self._as_root:
            return []
        if uid is None:
            raise ValueError("a sandbox started by root needs a uid of its own")
        pairs = [a for spot, path in binds for a in (path, spot)]
        path = "-" if report is None or report.path is None else report.path
        nproc = self.max_processes + 16
        return [
            "unshare", "--mount", "--propagation", "private", "--",
            "/bin/sh", "-c", STAGE_SCRIPT, str(uid), path, str(len(binds)), *pairs,
            "prlimit", f"--nproc={nproc}:{nproc}",
            f"--msgqueue={MSGQUEUE_BYTES}:{MSGQUEUE_BYTES}", "--",
        ]  # fmt: skip

    @cached_property
    def runner_path(self) -> str:
        """The runner, compiled once by the sandbox's interpreter: a cell then skips
        compiling 1,500 lines at every start (``runner.py`` itself if that fails)."""
        compiled = f"{self._state_dir}/runner.pyc"
        done = subprocess.run(
            [self.python, "-I", "-c",
             "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)",
             str(RUNNER), compiled],
            capture_output=True, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            self.log.warning("crucible: could not precompile the runner: %s", done.stderr[-500:])
            return str(RUNNER)
        return compiled

    @property
    def isolation(self) -> str:
        """``bubblewrap`` when sandboxes are isolated, else ``none``."""
        return "none" if self.bwrap_problem else "bubblewrap"

    # ----- starting ----------------------------------------------------------------------

    def _launch_report(self, group: cgroups.Group | None, isolated: bool) -> _LaunchReport:
        """The report of the launcher's steps for one sandbox: joining ``group``, and as root
        the binds of an isolated sandbox."""
        placed = ("placed",) if group is not None else ()
        steps = (*placed, *(("staged",) if isolated and self._as_root else ()))
        return _LaunchReport(steps, os.path.join(self._state_dir, "launch"))

    def _seccomp_fd(self) -> int | None:
        """A memfd holding the seccomp filter for one bubblewrap start (close it after)."""
        program = seccomp_program()
        if program is None:
            return None
        fd = os.memfd_create("crucible-seccomp", 0)
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _bwrap_argv(
        self,
        code_fd: int | None,
        seccomp_fd: int | None = None,
        report: _LaunchReport | None = None,
        uid: int | None = None,
    ) -> list[str]:
        argv = [
            self.bwrap_path or "bwrap",
            "--unshare-all",
            "--unshare-user",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--disable-userns",
            "--uid",
            str(SANDBOX_UID),
            "--gid",
            str(SANDBOX_UID),
            "--hostname",
            "crucible",
            "--clearenv",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                argv += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                argv += ["--ro-bind", top, top]
        for path in ETC_FILES:
            argv += ["--ro-bind-try", path, path]
        argv += [
            "--ro-bind",
            f"{self._state_dir}/passwd",
            "/etc/passwd",
            "--ro-bind",
            f"{self._state_dir}/group",
            "/etc/group",
        ]
        # /tmp first: an interpreter (a venv) that lives under /tmp is bound on top of it
        argv += ["--size", str(self.tmp_size), "--tmpfs", "/tmp"]
        for source, path in self._binds:
            argv += ["--ro-bind", source, path]
        argv += [
            "--proc",
            "/proc",
            # /proc/1 is bubblewrap's init in the sandbox, same user as the cell: through
            # /proc/1/mem a cell rewrote its code (setsid, clear its parent-death signal) so the
            # sandbox outlived every kill without a cgroup and held the dispatcher's pipes open
            # (the execution never ended). Hidden under an empty read-only folder.
            "--tmpfs",
            "/proc/1",
            "--remount-ro",
            "/proc/1",
            "--dev",
            "/dev",
            # /dev is a tmpfs of half the host's RAM, writable by the cell, /dev/shm a folder in
            # it: without a memory cgroup (rlimits only) a cell held that much RAM in files.
            # /dev/shm gets a size-limited tmpfs of its own and /dev itself is made read-only.
            "--size",
            str(self.tmp_size),
            "--tmpfs",
            "/dev/shm",
            "--remount-ro",
            "/dev",
            "--ro-bind",
            self.runner_path,
            f"{SANDBOX_DIR}/{Path(self.runner_path).name}",
        ]
        if code_fd is not None:
            argv += ["--ro-bind-data", str(code_fd), f"{SANDBOX_DIR}/cell.py"]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        argv += ["--remount-ro", "/", "--chdir", "/tmp"]
        return [*self._drop_argv(self._binds, report, uid), *argv]

    def _env(self, execution: Execution) -> dict[str, str]:
        return {**self._base_env(), **self._cell_env(execution)}

    @staticmethod
    def _cell_env(execution: Execution) -> dict[str, str]:
        return {**execution.request.env, "CRUCIBLE_EXECUTION_ID": execution.id}

    @staticmethod
    def _base_env() -> dict[str, str]:
        return {
            "HOME": "/tmp",
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TMPDIR": "/tmp",
            "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": "/tmp/.matplotlib",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    async def checks(self) -> list[Check]:
        """Report bubblewrap, cgroups and the interpreter, with how to fix what is missing."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            await self._discover()
        out = []
        problem = self.bwrap_problem
        if problem:
            out.append(
                Check(
                    "bubblewrap",
                    False,
                    problem + "; cells would run WITHOUT isolation",
                    fix="install it: apt-get install bubblewrap (and allow unprivileged user"
                    " namespaces: sysctl kernel.unprivileged_userns_clone=1)",
                )
            )
        else:
            out.append(Check("bubblewrap", True, f"{self.bwrap_path}: isolation 'bubblewrap'"))
        layout, detail = self.cgroup_layout
        out.append(
            Check(
                "cgroups",
                layout is not None,
                detail
                if layout
                else f"{detail}; memory falls back to RLIMIT_AS and process count is not limited",
                fix=None if layout else "run as root or delegate a cgroup subtree to this user",
                severity="warning",
            )
        )
        try:
            out.append(Check("python", True, f"{self.python} ({', '.join(self.python_paths)})"))
            exposure = self._exposure_problem()
            if exposure:
                out.append(Check("secrets", False, exposure, fix=EXPOSURE_FIX))
        except (OSError, subprocess.SubprocessError) as e:
            out.append(
                Check(
                    "python",
                    False,
                    f"cannot run {self.python}: {e}",
                    fix="set c.CrucibleLocalBackend.python to a working interpreter",
                )
            )
        if problem is None and self._as_root:
            out.append(
                Check(
                    "sandbox users",
                    True,
                    f"each sandbox runs as a host uid of its own, from {self.uid_range} (uid"
                    " 65534 inside): per-user kernel limits are not shared",
                )
            )
        elif problem is None:
            out.append(
                Check(
                    "sandbox users",
                    False,
                    f"every sandbox runs as your uid {os.geteuid()} (65534 inside): per-user"
                    " kernel limits (inotify instances, message-queue bytes, processes) are"
                    " shared between sandboxes and with your own processes",
                    fix="run crucible as root: each sandbox then gets a host uid of its own"
                    " (c.CrucibleLocalBackend.uid_range)",
                    severity="warning",
                )
            )
        if problem is None:
            n = self.warm_sandboxes
            out.append(
                Check(
                    "warm sandboxes",
                    True,
                    f"{n} kept started, each for one cell" if n else "off: cells start their own",
                )
            )
        return out

    async def _discover(self) -> None:
        """Probe bubblewrap, cgroups and the interpreter once, off the event loop (each is a
        subprocess or filesystem probe, cached afterwards)."""
        if "runner_path" not in self.__dict__:
            await asyncio.to_thread(
                lambda: (
                    self.bwrap_problem,
                    self.cgroup_layout,
                    self.python_paths,
                    self.exposed_secrets,
                    self.runner_path,
                    self._binds,
                )
            )

    def admit(self, request: ExecutionRequest) -> None:
        """Refuse a named image: a local sandbox runs this machine's Python, not an image."""
        if request.image and request.image != "default":
            raise InvalidRequest(
                f"image {request.image!r} cannot be used with the local backend, which runs this"
                " machine's Python; leave the image out, or run on a backend with images"
                " (backend 'kubernetes')",
                field="image",
            )

    async def start(self, execution: Execution) -> Sandbox:
        """Start the runner for ``execution`` in a fresh sandbox."""
        await self._discover()
        isolated = self.bwrap_problem is None
        exposure = self._exposure_problem()
        if isolated and exposure:
            raise Unavailable(f"{exposure}. To fix: {EXPOSURE_FIX}")
        if not isolated:
            if not self.allow_unisolated:
                raise Unavailable(
                    f"cannot isolate this cell: {self.bwrap_problem}. Install bubblewrap"
                    " (apt-get install bubblewrap) or allow unisolated runs with"
                    " c.CrucibleLocalBackend.allow_unisolated = True"
                )
            if not CrucibleLocalBackend._warned:
                CrucibleLocalBackend._warned = True
                self.log.warning(
                    "!!! crucible: %s. Cells run WITHOUT isolation (isolation='none'). "
                    "Install bubblewrap to isolate them: apt-get install bubblewrap",
                    self.bwrap_problem,
                )
        if isolated and self.warm_sandboxes > 0:
            warm = await self._claim_warm(execution)
            if warm is not None:
                return warm
        req = execution.request
        layout, _ = self.cgroup_layout
        lease = self._take_uid(isolated)
        group = None
        if layout is not None:
            try:
                group = cgroups.Group.create(
                    layout,
                    execution.id,
                    memory=req.resources.memory,
                    cpu=req.resources.cpu,
                    pids=self.max_processes,
                    sockets=self.socket_buffer_limit,
                )
            except OSError as e:
                self.log.warning(
                    "crucible: cgroup for %s failed (%s); using rlimits", execution.id, e
                )
                group = None
        runner_args = ["--rlimit-as", str(req.resources.memory)] if group is None else []

        code_fd = os.memfd_create("crucible-cell", 0) if isolated else None
        seccomp_fd = self._seccomp_fd() if isolated else None
        report = self._launch_report(group, isolated)
        workdir = None
        if isolated:
            os.write(code_fd, req.code.encode("utf-8"))
            os.lseek(code_fd, 0, os.SEEK_SET)
            argv = self._sandboxed_runner(
                self._env(execution), code_fd, seccomp_fd, report, lease.uid if lease else None
            )
            env = {}
            pass_fds = tuple(fd for fd in (code_fd, seccomp_fd) if fd is not None)
        else:
            workdir = tempfile.mkdtemp(prefix=f"crucible-{execution.id[:8]}-")
            Path(workdir, "cell.py").write_text(req.code, encoding="utf-8")  # noqa: ASYNC240
            argv = [self.python, "-I", self.runner_path, "--code-file", f"{workdir}/cell.py"]
            argv += self._runner_limits()
            env = {**self._env(execution), "HOME": workdir, "TMPDIR": workdir}
            pass_fds = ()
        argv += runner_args
        try:
            proc = await self._exec(argv, env, group, report, pass_fds=pass_fds, cwd=workdir or "/")
        except OSError as e:
            report.close()
            if group:
                group.remove()
            if lease:
                lease.release()
            raise Unavailable(f"could not start the sandbox: {e}") from e
        finally:
            for fd in (code_fd, seccomp_fd):
                if fd is not None:
                    os.close(fd)
        return LocalSandbox(
            isolation="bubblewrap" if isolated else "none",
            proc=proc,
            group=group,
            memory=req.resources.memory,
            max_processes=self.max_processes,
            max_line=self.max_line_bytes,
            workdir=workdir,
            report=report,
            lease=lease,
        )

    def _sandboxed_runner(
        self,
        env: dict[str, str],
        code_fd: int | None,
        seccomp_fd: int | None,
        report: _LaunchReport,
        uid: int | None,
    ) -> list[str]:
        """The bubblewrap command running the runner with ``env``: on the cell in ``code_fd``,
        or, without one, waiting for its cell on stdin (a warm sandbox); as host ``uid``
        when crucible runs as root."""
        setenv = [a for k, v in env.items() for a in ("--setenv", k, v)]
        code_file = "-" if code_fd is None else f"{SANDBOX_DIR}/cell.py"
        return [
            *self._bwrap_argv(code_fd, seccomp_fd, report, uid),
            *setenv,
            "--",
            self.python,
            "-I",
            f"{SANDBOX_DIR}/{Path(self.runner_path).name}",
            "--code-file",
            code_file,
            *self._runner_limits(),
        ]

    def _runner_limits(self) -> list[str]:
        """The runner's options every sandbox gets: rlimits (file size, open files) and the
        dispatcher's output limit (the runner writes no more output than that keeps)."""
        limit = getattr(self.parent, "output_limit", None)
        return [
            "--rlimit-fsize",
            str(self.max_file_size),
            "--rlimit-nofile",
            str(self.max_open_files),
            *(["--output-limit", str(limit)] if isinstance(limit, int) else []),
        ]

    async def _exec(
        self,
        argv: list[str],
        env: dict[str, str],
        group: cgroups.Group | None,
        report: _LaunchReport,
        *,
        pass_fds: tuple[int, ...] = (),
        cwd: str = "/",
    ) -> asyncio.subprocess.Process:
        """Start ``argv``; with a cgroup, the process joins it before exec'ing anything. The
        launcher's steps are reported on ``report`` (see :class:`_LaunchReport`)."""
        if group is not None:
            env = {**env, "CRUCIBLE_CGROUP_PROCS": " ".join(group.procs_files())}
            argv = ["/bin/sh", "-c", PLACE_SCRIPT, "crucible-sandbox", str(report.path), *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
            cwd=cwd,
            limit=1 << 16,
        )
        self._procs.add(proc)
        return proc

    # ----- warm sandboxes ----------------------------------------------------------------

    async def prepare(self) -> None:
        """Start the warm sandboxes (when bubblewrap isolates here); remove the empty cgroups
        a killed dispatcher left behind."""
        await self._discover()
        if self.bwrap_problem is None and self._exposure_problem() is None:
            self._keep_warm()
        layout, _ = self.cgroup_layout
        if layout is not None:
            removed = await asyncio.to_thread(cgroups.remove_stale, layout)
            if removed:
                self.log.info("crucible: removed %d cgroups a stopped dispatcher left", removed)
        await asyncio.to_thread(remove_stale_state_dirs)

    def _keep_warm(self) -> None:
        """Start sandboxes in the background until ``warm_sandboxes`` wait for a cell."""
        missing = self.warm_sandboxes - len(self._warm) - len(self._warming)
        for _ in range(0 if self._closed else missing):
            task = asyncio.ensure_future(self._start_warm())
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def _start_warm(self) -> None:
        layout, _ = self.cgroup_layout
        group = None
        seccomp_fd = None
        report = None
        lease = None
        try:
            seccomp_fd = self._seccomp_fd()
            lease = self._take_uid(True)
            if layout is not None:
                group = cgroups.Group.create(
                    layout,
                    f"warm-{secrets.token_hex(8)}",
                    memory=WARM_MEMORY,
                    cpu=1.0,
                    pids=self.max_processes,
                    sockets=self.socket_buffer_limit,
                )
            report = self._launch_report(group, True)
            uid = lease.uid if lease else None
            argv = self._sandboxed_runner(self._base_env(), None, seccomp_fd, report, uid)
            fds = () if seccomp_fd is None else (seccomp_fd,)
            proc = await self._exec(argv, {}, group, report, pass_fds=fds)
        except Exception as e:  # the next cell then starts a sandbox of its own
            self.log.warning("crucible: could not start a warm sandbox: %s", e)
            if report is not None:
                report.close()
            if group is not None:
                await _off_loop(group.remove)
            if lease is not None:
                lease.release()
            return
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        warm = _Warm(proc, group, report, lease)
        if self._closed:
            await self._discard(warm)
        else:
            self._warm.append(warm)

    async def _claim_warm(self, execution: Execution) -> LocalSandbox | None:
        """A warm sandbox running ``execution``, waiting for one that is being started if
        none is ready (starting another beside it would only compete for the CPU); None when
        none can be had."""
        for _ in range(self.warm_sandboxes + 1):
            if not self._warm:
                self._keep_warm()
                if not self._warming:
                    return None
                await asyncio.wait(set(self._warming), return_when=asyncio.FIRST_COMPLETED)
            sandbox = await self._claim(execution)
            if sandbox is not None:
                if not self._warm:  # else refill when this one ends: a start-up running
                    self._keep_warm()  # beside the cell would slow the cell down
                return sandbox
        return None

    async def _claim(self, execution: Execution) -> LocalSandbox | None:
        """Hand ``execution`` to a warm sandbox: its limits, then its cell. None if none is
        ready (the caller starts a sandbox of its own)."""
        req = execution.request
        while self._warm:
            warm = self._warm.pop(0)
            if warm.proc.returncode is not None or warm.proc.stdin is None:
                await self._discard(warm)
                continue
            try:
                if warm.group is not None:
                    warm.group.set_limits(
                        memory=req.resources.memory,
                        cpu=req.resources.cpu,
                        pids=self.max_processes,
                        sockets=self.socket_buffer_limit,
                    )
                cell = {
                    "code": req.code,
                    "env": self._cell_env(execution),
                    "rlimit_as": None if warm.group is not None else req.resources.memory,
                }
                warm.proc.stdin.write(json.dumps(cell).encode() + b"\n")
                await warm.proc.stdin.drain()
            except (OSError, RuntimeError) as e:
                self.log.debug("crucible: warm sandbox unusable (%s); trying another", e)
                await self._discard(warm)
                continue
            return LocalSandbox(
                isolation="bubblewrap",
                proc=warm.proc,
                group=warm.group,
                memory=req.resources.memory,
                max_processes=self.max_processes,
                max_line=self.max_line_bytes,
                workdir=None,
                on_exit=self._keep_warm,
                report=warm.report,
                lease=warm.lease,
            )
        return None

    @staticmethod
    async def _discard(warm: _Warm) -> None:
        """End a warm sandbox that will not run a cell, and remove its cgroup."""
        if warm.group is not None:
            warm.group.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(warm.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await warm.proc.wait()
        if warm.group is not None:
            await _off_loop(warm.group.remove)
        warm.report.close()
        if warm.lease is not None:
            warm.lease.release()  # nothing of the sandbox runs any more

    async def close(self) -> None:
        """End the warm sandboxes; remove the backend's scratch folder."""
        self._closed = True
        for task in list(self._warming):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        warm, self._warm = self._warm, []
        await asyncio.gather(*(self._discard(w) for w in warm))
        await self._release_processes()
        if "_state_dir" in self.__dict__:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            del self.__dict__["_state_dir"]

    async def _release_processes(self) -> None:
        """Kill what still runs and close every process's pipes while the event loop still
        runs (a transport left to the garbage collector complains once the loop is gone)."""
        procs = list(self._procs)
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            transport = getattr(proc, "_transport", None)  # asyncio keeps no public handle
            if transport is not None:
                transport.close()
        self._procs.clear()


def remove_stale_state_dirs(tmp: str | None = None, older_than: float = 600.0) -> int:
    """Delete the scratch folders (``crucible-local-<pid>-*``, older than ``older_than``
    seconds) of dispatchers whose process is gone (killed before they could clean up);
    returns how many."""
    removed = 0
    tmp = tmp or tempfile.gettempdir()
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(tmp):
            pid = entry.name[len(STATE_PREFIX) :].split("-", 1)[0]
            if not entry.name.startswith(STATE_PREFIX) or not pid.isdigit():
                continue
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                    continue
            try:
                os.kill(int(pid), 0)
                continue  # still running (or a new process with that pid: leave it)
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


async def _off_loop(fn: Callable[[], None]) -> None:
    """Run a short blocking clean-up in a thread, or right here when no thread can be had
    any more (the process is exiting and the executor is shut down)."""
    try:
        await asyncio.to_thread(fn)
    except RuntimeError:
        fn()


@dataclass
class _Warm:
    """A started sandbox whose runner waits for its cell on stdin."""

    proc: asyncio.subprocess.Process
    group: cgroups.Group | None
    report: _LaunchReport
    lease: uids.Lease | None  # its host uid, as root


class _LaunchReport:
    """What the launcher did before it started bubblewrap (or the runner): each step it
    finished (``placed`` in the cgroup, ``staged`` the binds as root) is appended as a word to
    a file in the backend's state folder, which no sandbox has in view. An infrastructure
    failure is a missing word, so a cell's exit code (125 for ``SystemExit(125)``) can neither
    forge one nor hide one. (Not a pipe: /bin/sh may only name fds 0-9, and a pipe the
    launcher could not close would reach the sandbox.)"""

    #: Each step, and the reason an execution fails with when the launcher did not finish it.
    REASONS = {
        "placed": "could not place the sandbox in its cgroup",
        "staged": "could not prepare the sandbox (binding its folders as root)",
    }

    def __init__(self, steps: tuple[str, ...], folder: str) -> None:
        self.steps = steps
        self.path: str | None = None
        self._said: bytes | None = None
        if steps:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd, self.path = tempfile.mkstemp(dir=folder, prefix="launch-")
            os.close(fd)

    def failure(self) -> str | None:
        """The reason for the first step the launcher did not report (ask once it has
        ended); None when every step was done."""
        if self._said is None and self.path is not None:
            with contextlib.suppress(OSError):
                self._said = Path(self.path).read_bytes()
        done = (self._said or b"").split()
        missing = [s for s in self.steps if s.encode() not in done]
        return self.REASONS[missing[0]] if missing else None

    def close(self) -> None:
        """Delete the file (what it said is kept for :meth:`failure`)."""
        if self.path is not None:
            self.failure()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


class LocalSandbox(Sandbox):
    """One running bubblewrap (or plain) process tree."""

    def __init__(
        self,
        *,
        isolation: str,
        proc: asyncio.subprocess.Process,
        group: cgroups.Group | None,
        memory: int,
        max_processes: int,
        max_line: int,
        workdir: str | None,
        report: _LaunchReport,
        lease: uids.Lease | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(isolation=isolation)
        self._on_exit = on_exit
        self.report = report
        self.lease = lease
        self._end: dict | None = None  # the runner's end frame
        self._frames_read: asyncio.Event | None = None  # set once its frames are all read
        self.proc = proc
        self.group = group
        self.memory = memory
        self.max_processes = max_processes
        self.max_line = max_line
        self.workdir = workdir

    async def lines(self) -> AsyncIterator[tuple[str, bytes, int]]:
        """Frames from the runner's stdout and raw text from stderr, as they arrive."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # back-pressure on a flood

        async def pump(kind: str, reader: asyncio.StreamReader) -> None:
            try:
                async for line, dropped in read_lines(reader, self.max_line):
                    if kind == FRAMES and not dropped and END_FRAME.match(line):
                        with contextlib.suppress(ValueError):
                            self._end = json.loads(line)
                    await queue.put((kind, line, dropped))
            finally:
                if kind == FRAMES:
                    frames_read.set()

        frames_read = self._frames_read = asyncio.Event()

        tasks = [
            asyncio.create_task(pump(FRAMES, self.proc.stdout)),
            asyncio.create_task(pump(STDERR, self.proc.stderr)),
        ]
        done = asyncio.gather(*tasks)
        getter = None
        try:
            while not (done.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, done], return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    item, getter = getter.result(), None
                    yield item
                else:
                    getter.cancel()
                    getter = None
        finally:
            if getter is not None:
                getter.cancel()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await done

    async def wait(self) -> Outcome:
        """Wait for exit; say whether a limit, the launcher or a signal ended it (each known
        from something the cell cannot forge, never from its exit code); remove the cgroup."""
        rc = await self.proc.wait()
        if self._on_exit is not None:
            self._on_exit()
        code = 128 - rc if rc < 0 else rc
        killed_by = -rc if rc < 0 else await self._reported_signal(code)
        reason = None
        if self.group is not None:
            if self.group.oom_killed():
                reason = f"memory limit exceeded ({format_bytes(self.memory)})"
            elif forks := self.group.pids_exhausted():
                reason = (
                    f"process limit reached ({self.max_processes} processes; {forks} forks refused)"
                )
            await _off_loop(self.group.remove)
        reason = reason or self.report.failure()
        self.report.close()
        if self.lease is not None:  # the cgroup is empty, or bubblewrap's init is gone
            self.lease.release()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return Outcome(exit_code=code, reason=reason, signal=killed_by)

    async def _reported_signal(self, code: int) -> int | None:
        """The signal that ended the cell, as its runner reported it in its end frame (the
        runner saw the cell's wait status; the cell cannot write frames), if the sandbox's
        exit code agrees. None when the cell exited, or nothing was reported."""
        if self._frames_read is not None:  # the end frame may still be on its way
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._frames_read.wait(), END_FRAME_WAIT)
        return reported_signal(self._end, code)

    async def interrupt(self) -> None:
        """Send ``interrupt`` to the runner, which raises KeyboardInterrupt in the cell."""
        if self.proc.stdin and not self.proc.stdin.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.write(b"interrupt\n")
                await self.proc.stdin.drain()

    async def kill(self) -> None:
        """SIGKILL the whole tree: the cgroup if any, and the sandbox's process group."""
        if self.group is not None:
            self.group.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
