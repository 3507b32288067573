"""Health of the local backend, as ``crucible doctor`` reports it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import TYPE_CHECKING

from ..base import Check

if TYPE_CHECKING:
    from .backend import CrucibleLocalBackend

EXPOSURE_FIX = (
    "run crucible with a Python installed in its own folder (a venv such as"
    " python3 -m venv ~/crucible-venv, or /usr/bin/python3) or set"
    " c.CrucibleLocalBackend.python; keep extra_ro_binds to folders without secrets"
)


async def checks(backend: CrucibleLocalBackend) -> list[Check]:
    """What ``crucible doctor`` reports for ``backend``: bubblewrap, cgroups, the interpreter,
    secrets in view, sandbox users and warm sandboxes, with how to fix what is missing."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        await backend.discover()
    out = []
    problem = backend.bwrap_problem
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
        out.append(Check("bubblewrap", True, f"{backend.bwrap_path}: isolation 'bubblewrap'"))
    layout, detail = backend.cgroup_layout
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
        out.append(Check("python", True, f"{backend.python} ({', '.join(backend.python_paths)})"))
        exposure = backend.exposure_problem()
        if exposure:
            out.append(Check("secrets", False, exposure, fix=EXPOSURE_FIX))
    except (OSError, subprocess.SubprocessError) as e:
        out.append(
            Check(
                "python",
                False,
                f"cannot run {backend.python}: {e}",
                fix="set c.CrucibleLocalBackend.python to a working interpreter",
            )
        )
    if problem is None and backend.as_root:
        out.append(
            Check(
                "sandbox users",
                True,
                f"each sandbox runs as a host uid of its own, from {backend.uid_range} (uid"
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
        n = backend.warm_sandboxes
        out.append(
            Check(
                "warm sandboxes",
                True,
                f"{n} kept started, each for one cell" if n else "off: cells start their own",
            )
        )
    return out
