"""Per-execution control groups: memory, process-count and CPU limits, and what they saw.

Works with cgroup v2 (a unified hierarchy with the controllers delegated to us) and with
cgroup v1 (one hierarchy per controller). Each execution gets a child group nested under
the group this process already lives in, so whoever manages this process keeps control.
When nothing is writable, :func:`probe` says why and the caller falls back to rlimits.

Where eBPF programs may be attached (root), each group also caps the IP sockets its processes
hold at once (sockcap.py): past a TCP memory limit the kernel still gives every socket about
one buffer, so only a bound on sockets bounds the host TCP memory a cell can take. Under
cgroup v1 that cap lives on the group's twin in the cgroup2 hierarchy mounted beside the v1
controllers (``/sys/fs/cgroup/unified``), which the sandbox joins as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from . import sockcap

CGROUP_ROOT = "/sys/fs/cgroup"
#: Where systemd mounts the cgroup2 hierarchy beside cgroup v1's ("hybrid" layout).
UNIFIED_ROOT = os.path.join(CGROUP_ROOT, "unified")
#: The key of that hierarchy's folder in :attr:`Layout.parents` (v1 only; no controller).
UNIFIED = "unified"
#: Host TCP memory allowed per capped IP socket: the cap is the group's TCP limit over this
#: (512 sockets for 64 MiB). Measured past the limit, each socket was force-charged up to
#: ~64 KiB: 510 connections of a 64 MiB cell grew host TCP memory by 96 MiB, 255 by 79 MiB.
SOCKET_SHARE = 128 << 10
#: The cap never goes below this many IP sockets (a 4 MiB cell can still open a few).
MIN_SOCKETS = 32
#: cgroup v1's limit on the TCP socket buffers of a group (v2 counts them as memory).
TCP_LIMIT_V1 = "memory.kmem.tcp.limit_in_bytes"


@dataclass(frozen=True)
class Layout:
    """Where to create groups: ``version`` 1 or 2 and, per controller, the parent folder."""

    version: int
    parents: dict[str, str]  # controller -> parent directory for our groups
    #: The folder (v2) whose groups get an IP-socket cap (sockcap.py); None: no cap here.
    socket_cap: str | None = None

    def socket_cap_dir(self, dirs: dict[str, str]) -> str | None:
        """Of one group's folders ``dirs``, the one its socket cap is attached to."""
        if self.socket_cap is None:
            return None
        return dirs[UNIFIED] if self.version == 1 else dirs["memory"]


def _own_paths() -> dict[str, str]:
    """Map controller name (or '' for v2) to this process's group path."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


def probe(base: str = "crucible") -> tuple[Layout | None, str]:
    """Find a writable cgroup layout with memory and pids control.

    Returns ``(layout, description)``; layout is None when limits must fall back to
    rlimits, and the description then says why.
    """
    try:
        own = _own_paths()
    except OSError as e:
        return None, f"cannot read /proc/self/cgroup: {e}"
    # cgroup v2 mounted at the root with memory and pids enabled
    v2_ctl = os.path.join(CGROUP_ROOT, "cgroup.controllers")
    if os.path.exists(v2_ctl):
        with open(v2_ctl) as f:
            ctrls = set(f.read().split())
        if {"memory", "pids"} <= ctrls:
            parent = os.path.join(CGROUP_ROOT, own.get("", "/").lstrip("/"), base)
            try:
                os.makedirs(parent, exist_ok=True)
                wanted = [c for c in ("memory", "pids", "cpu") if c in ctrls]
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join("+" + c for c in wanted))
                cap, said = _socket_cap(parent)
                layout = Layout(2, {c: parent for c in wanted}, cap)
                return layout, f"cgroup v2 at {parent}; {said}"
            except OSError as e:
                return None, f"cgroup v2 found but {parent} is not usable: {e}"
    parents = {}
    problems = []
    for ctrl in ("memory", "pids", "cpu"):
        mount = os.path.join(CGROUP_ROOT, ctrl)
        if not os.path.isdir(mount):
            problems.append(f"no {ctrl} controller mounted at {mount}")
            continue
        parent = os.path.join(mount, own.get(ctrl, "/").lstrip("/"), base)
        try:
            os.makedirs(parent, exist_ok=True)
            probe_dir = os.path.join(parent, f"probe-{os.getpid()}")
            os.makedirs(probe_dir, exist_ok=True)
            os.rmdir(probe_dir)
            parents[ctrl] = parent
        except OSError as e:
            problems.append(f"{parent} is not writable: {e.strerror}")
    if "memory" in parents and "pids" in parents:
        tcp = os.path.exists(os.path.join(parents["memory"], TCP_LIMIT_V1))
        sockets = (
            "socket buffers limited by memory.kmem.tcp"
            if tcp
            else "socket buffers NOT counted: this kernel has no memory.kmem.tcp.limit_in_bytes"
        )
        controllers = ", ".join(sorted(parents))
        unified = os.path.join(UNIFIED_ROOT, own.get("", "/").lstrip("/"), base)
        if os.path.exists(os.path.join(UNIFIED_ROOT, "cgroup.procs")):
            cap, said = _socket_cap(unified)
        else:
            cap, said = None, f"IP sockets NOT capped: no cgroup2 hierarchy at {UNIFIED_ROOT}"
        if cap is not None:
            parents[UNIFIED] = unified
        return Layout(1, parents, cap), f"cgroup v1 ({controllers}; {sockets}; {said})"
    return None, "; ".join(problems) or "no usable cgroup controllers"


def _socket_cap(parent: str) -> tuple[str | None, str]:
    """``(parent, description)`` if groups under the cgroup2 folder ``parent`` can get an
    IP-socket cap, else ``(None, why not)``."""
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        return None, f"IP sockets NOT capped: {parent} is not writable ({e.strerror})"
    problem = sockcap.problem(parent)
    if problem:
        return None, f"IP sockets NOT capped: {problem}"
    return parent, "IP sockets capped (eBPF)"


def socket_cap(tcp_limit: int) -> int:
    """How many IP sockets a group with ``tcp_limit`` bytes of TCP memory may hold at once."""
    return max(MIN_SOCKETS, tcp_limit // SOCKET_SHARE)


class Group:
    """One execution's control group(s). Create with :meth:`create`, always :meth:`remove`."""

    def __init__(self, layout: Layout, name: str) -> None:
        self.layout = layout
        self.dirs = {c: os.path.join(p, name) for c, p in layout.parents.items()}
        self.sockets: sockcap.SocketCap | None = None  # set with the first limits

    @classmethod
    def create(
        cls,
        layout: Layout,
        name: str,
        *,
        memory: int,
        cpu: float,
        pids: int,
        sockets: int | None = None,
    ) -> Group:
        """Make the group(s) and set memory (bytes, no swap), CPU (cores), pids and socket
        buffer limits (see :meth:`set_limits`)."""
        g = cls(layout, name)
        for d in set(g.dirs.values()):
            os.makedirs(d, exist_ok=True)
        g.set_limits(memory=memory, cpu=cpu, pids=pids, sockets=sockets)
        return g

    def set_limits(self, *, memory: int, cpu: float, pids: int, sockets: int | None = None) -> None:
        """Set memory (bytes, no swap), CPU (cores) and pids limits, and under cgroup v1 the
        TCP socket buffers' (bytes: ``sockets``, at most ``memory``; v2 counts them as
        memory), and the IP-socket cap where the layout has one (:func:`socket_cap` of that
        TCP limit); OSError if refused (for instance a memory limit below what the group
        already uses)."""
        tcp = memory if sockets is None else min(memory, sockets)
        cap_dir = self.layout.socket_cap_dir(self.dirs)
        if cap_dir is not None and self.sockets is None:
            self.sockets = sockcap.SocketCap(cap_dir, socket_cap(tcp))
        elif self.sockets is not None:
            self.sockets.set(socket_cap(tcp))
        if self.layout.version == 2:
            d = self.dirs["memory"]
            self._write(d, "memory.max", str(memory))
            self._write(d, "memory.swap.max", "0", optional=True)
            self._write(d, "pids.max", str(pids))
            if "cpu" in self.dirs:
                self._write(d, "cpu.max", f"{max(1000, int(cpu * 100_000))} 100000", optional=True)
            return
        mem = self.dirs["memory"]
        try:
            self._write(mem, "memory.limit_in_bytes", str(memory))
            self._write(mem, "memory.memsw.limit_in_bytes", str(memory), optional=True)
        except OSError:  # v1 wants memsw >= limit at all times: lower memsw first, then retry
            self._write(mem, "memory.memsw.limit_in_bytes", str(memory), optional=True)
            self._write(mem, "memory.limit_in_bytes", str(memory))
        # v1 charges socket buffers to a group only once it has a TCP limit (counted apart
        # from memory.limit_in_bytes), and only for sockets made after that: set with the
        # group's first limits, before any process joins. Without it a cell with 64 MiB
        # queued 400 MiB in loopback TCP buffers (host TCP memory, shared by every socket).
        self._write(mem, TCP_LIMIT_V1, str(tcp), optional=True)
        self._write(self.dirs["pids"], "pids.max", str(pids))
        if "cpu" in self.dirs:
            self._write(self.dirs["cpu"], "cpu.cfs_period_us", "100000", optional=True)
            self._write(
                self.dirs["cpu"], "cpu.cfs_quota_us", str(max(1000, int(cpu * 100_000))), True
            )

    @staticmethod
    def _write(d: str, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(d, name), "w") as f:
                f.write(value)
        except OSError:
            if not optional:
                raise

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a new process must write its pid into."""
        return [os.path.join(d, "cgroup.procs") for d in sorted(set(self.dirs.values()))]

    def pids(self) -> list[int]:
        """Host pids of every process currently in the group."""
        out: set[int] = set()
        for f in self.procs_files():
            with contextlib.suppress(OSError), open(f) as fh:
                out.update(int(x) for x in fh.read().split())
        return sorted(out)

    def kill(self) -> None:
        """SIGKILL every process in the group, and nothing else.

        v2's ``cgroup.kill`` does it in the kernel. Otherwise the pids are read from
        ``cgroup.procs``: one of them may have ended and its pid gone to a host process by
        the time it is signalled (by a dispatcher running as root), so each process is
        pinned with a pidfd first and signalled through it only if it is in this group."""
        d = self.dirs["memory"]
        if self.layout.version == 2 and os.path.exists(os.path.join(d, "cgroup.kill")):
            with contextlib.suppress(OSError):
                self._write(d, "cgroup.kill", "1")
                return
        for _ in range(3):  # a fork racing with the kill may add a process
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                self._kill_member(pid)

    def _kill_member(self, pid: int) -> None:
        """SIGKILL the process ``pid`` if it is in this group (see :meth:`kill`)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return  # ended (and not reused: then it would be found)
        except (OSError, AttributeError):  # no pidfd (Linux < 5.3): a window remains
            if self.holds(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            return
        try:
            # the pidfd names one process whatever becomes of the pid: if that process is
            # in the group now, it is the one signalled; if it has ended meanwhile (and the
            # pid was reused), the signal fails with ESRCH and reaches no one
            if self.holds(pid):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        finally:
            os.close(fd)

    def holds(self, pid: int) -> bool:
        """True if the process ``pid`` is in this group now (by ``/proc/PID/cgroup``)."""
        ctrl = "memory"
        mount = CGROUP_ROOT if self.layout.version == 2 else os.path.join(CGROUP_ROOT, ctrl)
        want = "/" + os.path.relpath(self.dirs[ctrl], mount)
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return False
        for line in lines:
            hid, ctrls, path = line.split(":", 2)
            mine = (
                hid == "0" and not ctrls if self.layout.version == 2 else ctrl in ctrls.split(",")
            )
            if mine:
                return path == want
        return False

    def _read_kv(self, ctrl: str, name: str) -> dict[str, int]:
        try:
            with open(os.path.join(self.dirs[ctrl], name)) as f:
                return {k: int(v) for k, v in (ln.split() for ln in f if len(ln.split()) == 2)}
        except (OSError, ValueError, KeyError):
            return {}

    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer ended a process of this group."""
        if self.layout.version == 2:
            return self._read_kv("memory", "memory.events").get("oom_kill", 0) > 0
        ctl = self._read_kv("memory", "memory.oom_control")
        if "oom_kill" in ctl:
            return ctl["oom_kill"] > 0
        try:  # old kernels: failcnt only says the limit was hit
            with open(os.path.join(self.dirs["memory"], "memory.failcnt")) as f:
                return int(f.read()) > 0
        except (OSError, ValueError):
            return False

    def pids_exhausted(self) -> int:
        """How many forks the process limit refused."""
        return self._read_kv("pids", "pids.events").get("max", 0)

    def remove(self) -> None:
        """Kill what is left and delete the group(s)."""
        if self.sockets is not None:
            self.sockets.close()
        self.kill()
        for d in sorted(set(self.dirs.values())):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self.kill()
                    time.sleep(0.01)


def remove_stale(layout: Layout, older_than: float = 600.0) -> int:
    """Delete the empty groups a dead dispatcher left under ``layout`` (it was killed before
    it could clean up): groups with no process that are older than ``older_than`` seconds.
    Groups in use, or too new to be sure, are left alone. Returns how many were removed."""
    removed = 0
    now = time.time()
    for parent in sorted(set(layout.parents.values())):
        try:
            children = list(os.scandir(parent))
        except OSError:
            continue
        for child in children:
            if not child.is_dir(follow_symlinks=False):
                continue
            try:
                if now - child.stat().st_mtime < older_than:
                    continue
                with open(os.path.join(child.path, "cgroup.procs")) as f:
                    if f.read().strip():
                        continue
                os.rmdir(child.path)
                removed += 1
            except OSError:
                continue
    return removed
