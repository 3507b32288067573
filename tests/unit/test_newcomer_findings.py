"""Defects a newcomer met following the README, each held by a test that failed before its fix.
The commands run as real processes (``crucible``, ``jupyter``), each on a SQLite database of
its own; the cells run in the real local sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture
def crucible(tmp_path):
    """Run ``crucible --db-url <a fresh SQLite file> ARGS`` from an empty directory."""
    url = f"sqlite:///{tmp_path}/crucible.db"

    def run(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "crucible"), "--db-url", url, *args],
            cwd=tmp_path,
            env=env,
            text=True,
            timeout=120,
            **{"capture_output": True, **kwargs},
        )

    return run


# ----- 1. `crucible history | head -1`: no traceback, the status of a closed pipe -------------


@pytest.mark.parametrize(
    "args", [["history"], ["history", "--json"], ["doctor", "--json"]], ids=" ".join
)
def test_a_closed_stdout_ends_the_command_quietly(crucible, args):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head -1`) is gone before the first line is written
    try:
        done = crucible(*args, stdout=write, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write)
    assert done.stderr == ""  # was: a BrokenPipeError traceback
    assert done.returncode == 128 + signal.SIGPIPE  # was 1; what a shell shows for SIGPIPE


# ----- 2. --help-all lists crucible's classes, with no import circle on the way ---------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["crucible", "serve"], ["CrucibleService", "CrucibleDispatcher", "CrucibleLocalBackend"]),
        (["jupyter", "server"], ["CrucibleApp", "CrucibleDispatcher", "CrucibleLocalBackend"]),
        (["jupyter", "crucible"], ["CrucibleApp", "CrucibleDispatcher", "CrucibleLocalBackend"]),
    ],
    ids=["crucible serve", "jupyter server", "jupyter crucible"],
)
def test_help_all_lists_the_crucible_classes_and_no_import_error(tmp_path, command, expected):
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help-all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # was: "crucible_jupyter: settings not listed here (cannot import name 'crucible_classes'
    # from partially initialized module 'crucible_jupyter.server.app' ...)"
    assert "settings not listed here" not in done.stderr
    assert "partially initialized" not in done.stderr
    for name in expected:
        assert f"--{name}." in done.stdout, name
