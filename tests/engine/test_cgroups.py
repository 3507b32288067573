"""Cgroups a killed dispatcher left behind are removed, and only those."""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import pytest

from crucible_jupyter.backends import cgroups


@pytest.fixture
def layout():
    layout, why = cgroups.probe()
    if layout is None:
        pytest.fail(f"this machine has usable cgroups; the probe says: {why}")
    return layout


def _age(group: cgroups.Group, seconds: float) -> None:
    then = time.time() - seconds
    for d in set(group.dirs.values()):
        os.utime(d, (then, then))


def _exists(group: cgroups.Group) -> bool:
    return all(os.path.isdir(d) for d in group.dirs.values())


def test_only_old_empty_groups_are_removed(layout):
    limits = {"memory": 64 << 20, "cpu": 0.5, "pids": 16}
    stale = cgroups.Group.create(layout, f"test-stale-{secrets.token_hex(4)}", **limits)
    fresh = cgroups.Group.create(layout, f"test-fresh-{secrets.token_hex(4)}", **limits)
    busy = cgroups.Group.create(layout, f"test-busy-{secrets.token_hex(4)}", **limits)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for f in busy.procs_files():
            with open(f, "w") as fh:
                fh.write(str(sleeper.pid))
        _age(stale, 3600)
        _age(busy, 3600)
        assert cgroups.remove_stale(layout, older_than=600) >= 1
        assert not _exists(stale)
        assert _exists(fresh) and _exists(busy)
    finally:
        sleeper.kill()
        sleeper.wait()
        for g in (stale, fresh, busy):
            g.remove()
