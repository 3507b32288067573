"""What a killed dispatcher left behind (cgroups, scratch folders) is removed, and only
that."""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import pytest

from crucible_jupyter.backends.local import cgroups


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
        assert _exists(fresh)
        assert _exists(busy)
    finally:
        sleeper.kill()
        sleeper.wait()
        for g in (stale, fresh, busy):
            g.remove()


def test_only_scratch_folders_of_dead_processes_are_removed(tmp_path):
    from crucible_jupyter.backends.local.launch import remove_stale_state_dirs

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"crucible-local-{gone.pid}-abc"
    alive = tmp_path / f"crucible-local-{os.getpid()}-def"
    other = tmp_path / "crucible-local-notapid"
    recent = tmp_path / f"crucible-local-{gone.pid}-new"
    for d in (dead, alive, other, recent):
        (d / "sub").mkdir(parents=True)
        if d is not recent:
            then = time.time() - 3600
            os.utime(d, (then, then))
    assert remove_stale_state_dirs(str(tmp_path)) == 1
    assert not dead.exists()
    assert alive.exists()
    assert other.exists()
    assert recent.exists()


async def test_a_dispatcher_names_its_scratch_folder_after_its_pid(make_dispatcher):
    d = await make_dispatcher()
    backend = d.get_backend("local")
    await backend.prepare()
    assert os.path.basename(backend._state_dir).startswith(f"crucible-local-{os.getpid()}-")
