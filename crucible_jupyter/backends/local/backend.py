"""The local backend: its settings, and each execution started in a bubblewrap sandbox.

The backend holds the settings and puts the parts together, as the Kubernetes backend does:
``bwrap.py`` builds the command lines (pure), ``seccomp.py`` the seccomp filter, ``launch.py``
starts the process (cgroup placement, launch report, scratch folder), ``sandbox.py`` follows
one running sandbox, ``warm.py`` keeps warm sandboxes, ``cgroups.py``/``sockcap.py`` limit
resources, ``uids.py`` leases host uids, ``doctor.py`` reports health.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import weakref
from functools import cached_property
from pathlib import Path
from typing import Any

from traitlets import Bool, Integer, List, TraitError, Unicode, default, validate

from ...errors import InvalidRequest, Unavailable
from ...models import Execution, ExecutionRequest
from ..base import Backend, Check, Sandbox
from . import cgroups, doctor, uids
from .bwrap import (
    SandboxSpec,
    base_env,
    cell_env,
    drop_argv,
    runner_options,
    sandboxed_runner,
)
from .doctor import EXPOSURE_FIX
from .launch import LaunchReport, launch, make_state_dir, release, remove_stale_state_dirs
from .sandbox import LocalSandbox, off_loop
from .seccomp import seccomp_fd
from .warm import WARM_MEMORY, Warm, WarmPool

RUNNER = Path(__file__).resolve().parent.parent.parent / "runner.py"


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
        self._procs: weakref.WeakSet[asyncio.subprocess.Process] = weakref.WeakSet()

    @cached_property
    def warm_pool(self) -> WarmPool:
        """The warm sandboxes (``warm_sandboxes`` of them), started by :meth:`_start_warm`."""
        return WarmPool(self.warm_sandboxes, self._start_warm, self.log)

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
        if self.as_root:
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
                    *self._probe_launcher(),
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

    def exposure_problem(self) -> str | None:
        """Why sandboxes must not start with these binds, or None."""
        if not self.exposed_secrets:
            return None
        bound = ", ".join(self.exposed_secrets)
        return f"cells would see secrets: the folders bound into every sandbox include {bound}"

    @cached_property
    def as_root(self) -> bool:
        """True when crucible runs as root: each sandbox is then started as a host uid of its
        own, from ``uid_range``."""
        return os.geteuid() == 0

    @cached_property
    def _uid_leases(self) -> uids.UidLeases:
        """The host uids of sandboxes (as root), leased host-wide: see uids.py."""
        first, last = uids.parse_range(self.uid_range)
        return uids.UidLeases(first, last, self.uid_lock_dir)

    def _probe_launcher(self) -> list[str]:
        """As root, the launcher of the bubblewrap probe: the range's first uid, no lease
        (``true`` runs for a moment), nothing bound. Empty otherwise."""
        if not self.as_root:
            return []
        return drop_argv((), None, self._uid_leases.first, self.max_processes)

    def _take_uid(self, isolated: bool) -> uids.Lease | None:
        """A host uid for one isolated sandbox, when crucible runs as root (None otherwise)."""
        return self._uid_leases.take() if isolated and self.as_root else None

    @cached_property
    def _state_dir(self) -> str:
        return make_state_dir()

    @cached_property
    def _binds(self) -> list[tuple[str, str]]:
        """``(source, destination)`` of the extra read-only binds (the Python installation,
        ``extra_ro_binds``). As root, each source is a stand-in in the state folder that the
        launcher binds the real folder onto in a private mount namespace: uid 65534 may not
        be able to reach the real one (a Python under /root)."""
        paths = [*self.python_paths, *self.extra_ro_binds]
        if not self.as_root:
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

    @cached_property
    def sandbox_spec(self) -> SandboxSpec:
        """What every sandbox of this backend is made of (once discovery is done)."""
        return SandboxSpec(
            bwrap=self.bwrap_path or "bwrap",
            python=self.python,
            runner=self.runner_path,
            state_dir=self._state_dir,
            binds=tuple(self._binds),
            tmp_size=self.tmp_size,
            as_root=self.as_root,
            max_processes=self.max_processes,
        )

    @property
    def isolation(self) -> str:
        """``bubblewrap`` when sandboxes are isolated, else ``none``."""
        return "none" if self.bwrap_problem else "bubblewrap"

    async def checks(self) -> list[Check]:
        """Report bubblewrap, cgroups and the interpreter, with how to fix what is missing
        (``doctor.py``)."""
        return await doctor.checks(self)

    async def discover(self) -> None:
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

    # ----- starting ----------------------------------------------------------------------

    def admit(self, request: ExecutionRequest) -> None:
        """Refuse a named image: a local sandbox runs this machine's Python, not an image."""
        if request.image and request.image != "default":
            raise InvalidRequest(
                f"image {request.image!r} cannot be used with the local backend, which runs this"
                " machine's Python; leave the image out, or run on a backend with images"
                " (backend 'kubernetes')",
                field="image",
            )

    def _launch_report(self, group: cgroups.Group | None, isolated: bool) -> LaunchReport:
        """The report of the launcher's steps for one sandbox: joining ``group``, and as root
        the binds of an isolated sandbox."""
        placed = ("placed",) if group is not None else ()
        steps = (*placed, *(("staged",) if isolated and self.as_root else ()))
        return LaunchReport(steps, os.path.join(self._state_dir, "launch"))

    def _runner_options(self) -> list[str]:
        """The runner's options every sandbox gets (see :func:`.bwrap.runner_options`)."""
        return runner_options(self.max_file_size, self.max_open_files, self.output_limit)

    def _sandboxed_runner(
        self,
        env: dict[str, str],
        code_fd: int | None,
        seccomp: int | None,
        report: LaunchReport,
        uid: int | None,
    ) -> list[str]:
        """The bubblewrap command running the runner (see :func:`.bwrap.sandboxed_runner`)."""
        return sandboxed_runner(
            self.sandbox_spec, env, code_fd, seccomp, report.path, uid, self._runner_options()
        )

    async def start(self, execution: Execution) -> Sandbox:
        """Start the runner for ``execution`` in a fresh sandbox."""
        await self.discover()
        isolated = self.bwrap_problem is None
        exposure = self.exposure_problem()
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
            warm = await self.warm_pool.claim(lambda w: self._hand_over(w, execution))
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
        seccomp = seccomp_fd() if isolated else None
        report = self._launch_report(group, isolated)
        workdir = None
        if code_fd is not None:  # isolated
            os.write(code_fd, req.code.encode("utf-8"))
            os.lseek(code_fd, 0, os.SEEK_SET)
            env = {**base_env(), **cell_env(execution)}
            argv = self._sandboxed_runner(
                env, code_fd, seccomp, report, lease.uid if lease else None
            )
            env = {}
            pass_fds = tuple(fd for fd in (code_fd, seccomp) if fd is not None)
        else:
            workdir = tempfile.mkdtemp(prefix=f"crucible-{execution.id[:8]}-")
            Path(workdir, "cell.py").write_text(req.code, encoding="utf-8")  # noqa: ASYNC240
            argv = [self.python, "-I", self.runner_path, "--code-file", f"{workdir}/cell.py"]
            argv += self._runner_options()
            env = {
                **base_env(),
                **cell_env(execution),
                "HOME": workdir,
                "TMPDIR": workdir,
            }
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
            for fd in (code_fd, seccomp):
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

    async def _exec(
        self,
        argv: list[str],
        env: dict[str, str],
        group: cgroups.Group | None,
        report: LaunchReport,
        *,
        pass_fds: tuple[int, ...] = (),
        cwd: str = "/",
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` (see :func:`launch.launch`); kept until :meth:`close`."""
        proc = await launch(argv, env, group, report, pass_fds=pass_fds, cwd=cwd)
        self._procs.add(proc)
        return proc

    # ----- warm sandboxes ----------------------------------------------------------------

    async def prepare(self) -> None:
        """Start the warm sandboxes (when bubblewrap isolates here); remove the empty cgroups
        a killed dispatcher left behind."""
        await self.discover()
        if self.bwrap_problem is None and self.exposure_problem() is None:
            self.warm_pool.fill()
        layout, _ = self.cgroup_layout
        if layout is not None:
            removed = await asyncio.to_thread(cgroups.remove_stale, layout)
            if removed:
                self.log.info("crucible: removed %d cgroups a stopped dispatcher left", removed)
        await asyncio.to_thread(remove_stale_state_dirs)

    async def _start_warm(self) -> Warm:
        """Start one warm sandbox (the pool's factory); on failure, release what it took and
        raise."""
        layout, _ = self.cgroup_layout
        group = None
        seccomp = None
        report = None
        lease = None
        try:
            seccomp = seccomp_fd()
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
            argv = self._sandboxed_runner(base_env(), None, seccomp, report, uid)
            fds = () if seccomp is None else (seccomp,)
            proc = await self._exec(argv, {}, group, report, pass_fds=fds)
        except Exception:  # any failure to start: give back what was taken, then re-raise
            if report is not None:
                report.close()
            if group is not None:
                await off_loop(group.remove)
            if lease is not None:
                lease.release()
            raise
        finally:
            if seccomp is not None:
                os.close(seccomp)
        return Warm(proc, group, report, lease)

    async def _hand_over(self, warm: Warm, execution: Execution) -> LocalSandbox:
        """Give ``warm`` the limits of ``execution``, then its cell; raises OSError or
        RuntimeError when the sandbox cannot take it."""
        req = execution.request
        if warm.group is not None:
            warm.group.set_limits(
                memory=req.resources.memory,
                cpu=req.resources.cpu,
                pids=self.max_processes,
                sockets=self.socket_buffer_limit,
            )
        cell = {
            "code": req.code,
            "env": cell_env(execution),
            "rlimit_as": None if warm.group is not None else req.resources.memory,
        }
        assert warm.proc.stdin is not None  # the pool hands over only sandboxes with one
        warm.proc.stdin.write(json.dumps(cell).encode() + b"\n")
        await warm.proc.stdin.drain()
        return LocalSandbox(
            isolation="bubblewrap",
            proc=warm.proc,
            group=warm.group,
            memory=req.resources.memory,
            max_processes=self.max_processes,
            max_line=self.max_line_bytes,
            workdir=None,
            on_exit=self.warm_pool.fill,
            report=warm.report,
            lease=warm.lease,
        )

    async def close(self) -> None:
        """End the warm sandboxes; remove the backend's scratch folder."""
        await self.warm_pool.close()  # and none start afterwards
        await release(self._procs)
        self._procs.clear()
        if "_state_dir" in self.__dict__:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            del self.__dict__["_state_dir"]
