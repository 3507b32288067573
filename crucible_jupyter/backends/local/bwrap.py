"""The command lines that start a local sandbox: bubblewrap's arguments, and as root the
launcher that starts bubblewrap as a host uid of the sandbox's own.

Pure: these functions build argument lists and environments from what they are given (and
from how the host's top folders are laid out: ``/bin`` a folder or a symlink); they start
nothing. The backend (``backend.py``) decides what to give them; ``launch.py`` runs them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...models import Execution
from ...protocol import ENV_EXECUTION_ID

#: Where the runner and the cell are inside the sandbox.
SANDBOX_DIR = "/opt/crucible"
#: The cell's uid and gid inside the sandbox (``nobody``), whatever its host uid.
SANDBOX_UID = 65534
PASSWD = "sandbox:x:65534:65534:crucible sandbox:/tmp:/usr/sbin/nologin\n"
GROUP = "sandbox:x:65534:\n"
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


@dataclass(frozen=True)
class SandboxSpec:
    """What every sandbox of one backend is made of (fixed once the backend has looked
    around: see ``CrucibleLocalBackend.sandbox_spec``)."""

    bwrap: str  # the bubblewrap executable
    python: str  # the interpreter that runs the runner inside
    runner: str  # the runner on the host (compiled), bound read-only inside
    state_dir: str  # the backend's scratch folder (passwd, group)
    binds: tuple[tuple[str, str], ...]  # extra read-only binds: (source, destination)
    tmp_size: int  # bytes of the private /tmp and of /dev/shm
    as_root: bool  # crucible runs as root: bubblewrap starts as a uid of the sandbox's own
    max_processes: int  # the cgroup's process limit (the uid's RLIMIT_NPROC lies above it)


def drop_argv(
    binds: tuple[tuple[str, str], ...] | list[tuple[str, str]],
    report: str | None,
    uid: int,
    max_processes: int,
) -> list[str]:
    """The launcher, for crucible running as root, that binds ``binds`` (stand-in ← real
    folder) in a private mount namespace, reports it in the file ``report`` (None: nowhere)
    and starts what follows as host ``uid`` (the sandbox's own), with low per-uid rlimits."""
    pairs = [a for spot, path in binds for a in (path, spot)]
    nproc = max_processes + 16
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "/bin/sh", "-c", STAGE_SCRIPT, str(uid), report or "-", str(len(binds)), *pairs,
        "prlimit", f"--nproc={nproc}:{nproc}",
        f"--msgqueue={MSGQUEUE_BYTES}:{MSGQUEUE_BYTES}", "--",
    ]  # fmt: skip


def bwrap_argv(spec: SandboxSpec, code_fd: int | None, seccomp_fd: int | None) -> list[str]:
    """bubblewrap's own arguments: every namespace unshared, a read-only minimal root, a
    private ``/tmp``, the runner (and the cell in ``code_fd``, if given) under
    :data:`SANDBOX_DIR`, the seccomp filter in ``seccomp_fd`` (if given)."""
    argv = [
        spec.bwrap,
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
        f"{spec.state_dir}/passwd",
        "/etc/passwd",
        "--ro-bind",
        f"{spec.state_dir}/group",
        "/etc/group",
    ]
    # /tmp first: an interpreter (a venv) that lives under /tmp is bound on top of it
    argv += ["--size", str(spec.tmp_size), "--tmpfs", "/tmp"]
    for source, path in spec.binds:
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
        str(spec.tmp_size),
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--ro-bind",
        spec.runner,
        f"{SANDBOX_DIR}/{Path(spec.runner).name}",
    ]
    if code_fd is not None:
        argv += ["--ro-bind-data", str(code_fd), f"{SANDBOX_DIR}/cell.py"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    argv += ["--remount-ro", "/", "--chdir", "/tmp"]
    return argv


def sandboxed_runner(
    spec: SandboxSpec,
    env: dict[str, str],
    code_fd: int | None,
    seccomp_fd: int | None,
    report: str | None,
    uid: int | None,
    runner_options: list[str],
) -> list[str]:
    """The whole command running the runner in a sandbox with ``env`` and ``runner_options``:
    on the cell in ``code_fd``, or, without one, waiting for its cell on stdin (a warm
    sandbox); as root, started as host ``uid`` by :func:`drop_argv` (reporting in the file
    ``report``)."""
    drop: list[str] = []
    if spec.as_root:
        if uid is None:
            raise ValueError("a sandbox started by root needs a uid of its own")
        drop = drop_argv(spec.binds, report, uid, spec.max_processes)
    setenv = [a for k, v in env.items() for a in ("--setenv", k, v)]
    code_file = "-" if code_fd is None else f"{SANDBOX_DIR}/cell.py"
    return [
        *drop,
        *bwrap_argv(spec, code_fd, seccomp_fd),
        *setenv,
        "--",
        spec.python,
        "-I",
        f"{SANDBOX_DIR}/{Path(spec.runner).name}",
        "--code-file",
        code_file,
        *runner_options,
    ]


def runner_options(max_file_size: int, max_open_files: int, output_limit: int | None) -> list[str]:
    """The runner's options every sandbox gets: rlimits (file size, open files) and the
    dispatcher's output limit (the runner writes no more output than that keeps)."""
    return [
        "--rlimit-fsize",
        str(max_file_size),
        "--rlimit-nofile",
        str(max_open_files),
        *(["--output-limit", str(output_limit)] if isinstance(output_limit, int) else []),
    ]


def base_env() -> dict[str, str]:
    """The environment every sandbox starts with (a warm one has only this until its cell)."""
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


def cell_env(execution: Execution) -> dict[str, str]:
    """What one cell adds to :func:`base_env`: its request's variables and its id."""
    return {**execution.request.env, ENV_EXECUTION_ID: execution.id}
