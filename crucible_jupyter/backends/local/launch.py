"""Starting a sandbox's process: joining its cgroup before anything runs, the launch report
that says which launcher steps were done, and the backend's scratch folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from . import cgroups
from .bwrap import GROUP, PASSWD

#: Scratch folders are ``<tmp>/crucible-local-<pid>-<random>``.
STATE_PREFIX = "crucible-local-"
#: Joins the execution's cgroup(s) (``$CRUCIBLE_CGROUP_PROCS``), says so in the launch report
#: (file ``$1``), then runs the rest. The cell cannot reach the report: its own exit code 125
#: is only an exit code.
PLACE_SCRIPT = (
    'for f in $CRUCIBLE_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done;'
    ' unset CRUCIBLE_CGROUP_PROCS; echo placed >> "$1" || exit 125; shift; exec "$@"'
)


class LaunchReport:
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


async def launch(
    argv: list[str],
    env: dict[str, str],
    group: cgroups.Group | None,
    report: LaunchReport,
    *,
    pass_fds: tuple[int, ...] = (),
    cwd: str = "/",
) -> asyncio.subprocess.Process:
    """Start ``argv`` in a session of its own, with pipes for stdin, stdout and stderr; with a
    cgroup, the process joins it before exec'ing anything, and says so on ``report``."""
    if group is not None:
        env = {**env, "CRUCIBLE_CGROUP_PROCS": " ".join(group.procs_files())}
        argv = ["/bin/sh", "-c", PLACE_SCRIPT, "crucible-sandbox", str(report.path), *argv]
    return await asyncio.create_subprocess_exec(
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


async def release(procs: Iterable[asyncio.subprocess.Process]) -> None:
    """Kill what still runs of ``procs`` and close every one's pipes while the event loop
    still runs (a transport left to the garbage collector complains once the loop is gone)."""
    procs = list(procs)
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


def make_state_dir() -> str:
    """A new scratch folder for one backend (``crucible-local-<pid>-…``) with the sandbox's
    ``passwd`` and ``group``; readable by every uid (bubblewrap may run as a sandbox's uid;
    nothing secret is in it)."""
    d = tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-")
    os.chmod(d, 0o755)
    Path(d, "passwd").write_text(PASSWD)
    Path(d, "group").write_text(GROUP)
    return d


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
