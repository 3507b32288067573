"""A cap on the IP sockets one sandbox holds at once, kept by the kernel (eBPF on a cgroup).

Why: past a group's TCP memory limit the kernel still force-charges about one buffer to each
socket that sends or receives (a socket must always make progress), so host TCP memory grows
with the number of sockets, not with the limit: a 1 GiB cell with a 64 MiB TCP limit held
984 MiB of host TCP memory in 11,520 loopback connections. The number of sockets is bounded by
nothing else (file descriptors are per process, and processes multiply them).

How: three tiny classic-eBPF programs attached to the sandbox's cgroup (v2; on a cgroup v1
machine, its group in the cgroup2 hierarchy that is mounted beside the v1 controllers) share a
two-slot array: slot 0 counts the group's live IP sockets, slot 1 is the cap.

* ``cgroup/sock_create`` runs when the group makes an AF_INET/AF_INET6 socket (TCP, UDP, ICMP):
  it refuses it (``socket()`` fails with EPERM) once the count has reached the cap, else counts it.
* ``sockops`` counts a connection the group accepts (``accept()`` makes no new socket through
  ``socket()``), when its handshake completes: it is a socket of the group from then on.
* ``cgroup/sock_release`` uncounts a socket when its last descriptor is closed.

The programs belong to the group: they end with it, whatever the sandbox does; the cell has no
capability to detach them (and seccomp refuses ``bpf``). Written by hand like the seccomp filter
(seccomp.py), for the same reason: a few instructions do not need a compiler or libbpf. Loading
them needs root (CAP_BPF and CAP_NET_ADMIN): :func:`problem` says when they cannot be had.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import struct
from functools import cache

#: bpf(2) on x86_64 and aarch64.
SYS_BPF = {"x86_64": 321, "aarch64": 280}
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, PROG_LOAD, PROG_ATTACH = 0, 1, 2, 5, 8
MAP_TYPE_ARRAY = 2
PROG_TYPE_CGROUP_SOCK, PROG_TYPE_SOCK_OPS = 9, 13
ATTACH_SOCK_CREATE, ATTACH_SOCK_OPS, ATTACH_SOCK_RELEASE = 2, 3, 34
SOCK_OPS_PASSIVE_ESTABLISHED_CB = 5
COUNT, CAP = 0, 1  # the array's slots

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"no bpf(2) number known for {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(128))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return ret


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


# eBPF opcodes used below
MOV64_IMM, MOV64_REG, ADD64_IMM = 0xB7, 0xBF, 0x07
LD_MAP_FD, ST_W, LDX_W, LDX_DW = 0x18, 0x62, 0x61, 0x79
ATOMIC_ADD_DW, CALL, EXIT = 0xDB, 0x85, 0x95
JEQ_IMM, JNE_IMM, JSGE_REG = 0x15, 0x55, 0x7D
MAP_LOOKUP = 1  # bpf_map_lookup_elem
R0, R1, R2, R6, R10 = 0, 1, 2, 6, 10


def _lookup(map_fd: int, slot: int, miss: int) -> bytes:
    """r0 = &array[slot], or jump ``miss`` instructions past this block when absent (never)."""
    return b"".join(
        [
            _insn(ST_W, R10, off=-4, imm=slot),
            _insn(MOV64_REG, R2, R10),
            _insn(ADD64_IMM, R2, imm=-4),
            _insn(LD_MAP_FD, R1, 1, imm=map_fd),  # src 1: BPF_PSEUDO_MAP_FD
            _insn(0),
            _insn(CALL, imm=MAP_LOOKUP),
            _insn(JEQ_IMM, R0, off=miss, imm=0),
        ]
    )


def _add(delta: int) -> bytes:
    """Atomically add ``delta`` to the u64 r0 points to."""
    return _insn(MOV64_IMM, R1, imm=delta) + _insn(ATOMIC_ADD_DW, R0, R1)


ALLOW = _insn(MOV64_IMM, R0, imm=1) + _insn(EXIT)
DENY = _insn(MOV64_IMM, R0, imm=0) + _insn(EXIT)


def _n(code: bytes) -> int:
    return len(code) // 8


def create_program(map_fd: int) -> bytes:
    """sock_create: refuse once count >= cap, else count += 1."""
    count_to_r6 = _insn(MOV64_REG, R6, R0)
    # count in r1, cap in r2: `if r1 s>= r2` jumps over the counting and ALLOW to DENY; a
    # missing slot (never) jumps to ALLOW
    check = _insn(LDX_DW, R1, R6) + _insn(LDX_DW, R2, R0)
    counted = _insn(MOV64_REG, R0, R6) + _add(1)
    jump = _insn(JSGE_REG, R1, R2, off=_n(counted + ALLOW))
    second = _lookup(map_fd, CAP, _n(check + jump + counted))
    first = _lookup(map_fd, COUNT, _n(count_to_r6 + second + check + jump + counted))
    return first + count_to_r6 + second + check + jump + counted + ALLOW + DENY


def release_program(map_fd: int) -> bytes:
    """sock_release: count -= 1."""
    return _lookup(map_fd, COUNT, _n(_add(-1))) + _add(-1) + ALLOW


def sockops_program(map_fd: int) -> bytes:
    """sockops: count += 1 when an accepted connection completes its handshake."""
    body = _lookup(map_fd, COUNT, _n(_add(1))) + _add(1)
    op = _insn(LDX_W, R2, R1, off=0) + _insn(JNE_IMM, R2, off=_n(body), imm=5)
    return op + body + ALLOW


def _load(prog_type: int, attach_type: int, insns: bytes, name: bytes) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)

    def attr(level: int) -> bytes:
        return struct.pack(
            "<IIQQIIQII16sII",
            prog_type, len(insns) // 8, ctypes.addressof(code), ctypes.addressof(license),
            level, len(log) if level else 0, ctypes.addressof(log) if level else 0,
            0, 0, name, 0, attach_type,
        )  # fmt: skip

    try:
        return _bpf(PROG_LOAD, attr(0))
    except OSError as e:
        with contextlib.suppress(OSError):  # again, for the verifier's words
            os.close(_bpf(PROG_LOAD, attr(1)))
        said = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise OSError(e.errno, f"loading {name.decode()}: {e.strerror} {said[0]}") from None


class SocketCap:
    """The cap on one cgroup's live IP sockets. :meth:`close` the descriptors when done (the
    programs stay attached to the group until it is removed)."""

    def __init__(self, group_dir: str, cap: int) -> None:
        """Attach the programs to the cgroup(v2) folder ``group_dir`` with ``cap``; OSError
        when the kernel refuses (not root, no eBPF, ...)."""
        self.map_fd = _bpf(MAP_CREATE, struct.pack("<IIIII", MAP_TYPE_ARRAY, 4, 8, 2, 0))
        fds: list[int] = []
        try:
            self.set(cap)
            dir_fd = os.open(group_dir, os.O_RDONLY | os.O_DIRECTORY)
            fds.append(dir_fd)
            for prog_type, attach, insns, name in (
                (PROG_TYPE_CGROUP_SOCK, ATTACH_SOCK_CREATE, create_program, b"crucible_sock"),
                (PROG_TYPE_CGROUP_SOCK, ATTACH_SOCK_RELEASE, release_program, b"crucible_rel"),
                (PROG_TYPE_SOCK_OPS, ATTACH_SOCK_OPS, sockops_program, b"crucible_ops"),
            ):
                prog = _load(prog_type, attach, insns(self.map_fd), name)
                fds.append(prog)
                _bpf(PROG_ATTACH, struct.pack("<IIII", dir_fd, prog, attach, 0))
        except BaseException:  # interrupted too: close the map, then re-raise
            os.close(self.map_fd)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def set(self, cap: int) -> None:
        """Change the cap (a warm sandbox gets its cell's)."""
        self._update(CAP, cap)

    def count(self) -> int:
        """The group's live IP sockets, as counted."""
        key, value = ctypes.c_uint32(COUNT), ctypes.c_int64()
        attr = struct.pack(
            "<IIQQQ", self.map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0
        )
        _bpf(MAP_LOOKUP_ELEM, attr)
        return value.value

    def _update(self, slot: int, value: int) -> None:
        key, val = ctypes.c_uint32(slot), ctypes.c_int64(value)
        attr = struct.pack(
            "<IIQQQ", self.map_fd, 0, ctypes.addressof(key), ctypes.addressof(val), 0
        )
        _bpf(MAP_UPDATE_ELEM, attr)

    def close(self) -> None:
        """Let go of the array (the attached programs keep it while the group lives)."""
        if self.map_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.map_fd)
            self.map_fd = -1


@cache
def problem(group_dir: str) -> str | None:
    """None when a cap can be attached to groups like ``group_dir``'s parent here; otherwise
    why not (asked once per parent)."""
    probe_dir = os.path.join(group_dir, f"sockcap-probe-{os.getpid()}")
    try:
        os.makedirs(probe_dir, exist_ok=True)
        SocketCap(probe_dir, 1).close()
        return None
    except OSError as e:
        return f"cannot attach eBPF programs to {group_dir}: {e.strerror or e}"
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe_dir)
