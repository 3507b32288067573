"""The cell runner (crucible_jupyter/runner.py) as a real subprocess, as sandboxes and pods
run it: run a cell, parse and check its frames."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "crucible_jupyter" / "runner.py"
# The runner must work on any Python >= 3.8: point this at another interpreter to check one.
PYTHON = os.environ.get("CRUCIBLE_RUNNER_PYTHON") or sys.executable
TIMEOUT = 60


@functools.cache
def runner_python_has(module: str) -> bool:
    """Whether the interpreter that runs the runner can import *module*."""
    proc = subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True)
    return proc.returncode == 0


def parse_frames(raw: bytes) -> list[dict]:
    """Every line must be strict UTF-8 JSON; returns the frames."""
    assert raw.endswith(b"\n")
    return [json.loads(line.decode("utf-8")) for line in raw.split(b"\n")[:-1]]


def check_frames(frames: list[dict], exit_code: int) -> None:
    """The frames are numbered from 0, versioned, start once and end once with ``exit_code``."""
    assert [f["seq"] for f in frames] == list(range(len(frames)))
    assert all(f["v"] == 1 and isinstance(f["t"], int) for f in frames)
    assert frames[0]["type"] == "start"
    assert frames[-1] == {**frames[-1], "type": "end", "exit_code": exit_code}
    assert [f["type"] for f in frames].count("end") == 1


class Result:
    """A finished run: its frames, return code and stderr."""

    def __init__(self, frames: list[dict], returncode: int, stderr: bytes):
        self.frames = frames
        self.returncode = returncode
        self.stderr = stderr

    def of(self, type_: str) -> list[dict]:
        """The frames of one type."""
        return [f for f in self.frames if f["type"] == type_]

    def text(self, name: str) -> str:
        """All text of stream ``name``."""
        return "".join(f["text"] for f in self.of("stream") if f["name"] == name)

    def streams(self) -> list[tuple[str, str]]:
        """(name, line) for every line of stream output, in frame order."""
        out: list[tuple[str, str]] = []
        for f in self.of("stream"):
            out.extend((f["name"], line) for line in f["text"].splitlines())
        return out

    @property
    def exit_code(self) -> int:
        """The end frame's exit code."""
        return self.frames[-1]["exit_code"]


def write_cell(tmp_path: Path, code: str) -> Path:
    """``code`` written to ``tmp_path/cell.py``; its path."""
    path = tmp_path / "cell.py"
    path.write_text(code, encoding="utf-8")
    return path


def run_cell(tmp_path: Path, code: str, *args: str) -> Result:
    """Run ``code`` through the runner (extra runner ``args``) to its end; frames checked."""
    cmd = [PYTHON, str(RUNNER), "--code-file", str(write_cell(tmp_path, code)), *args]
    proc = subprocess.run(
        cmd, stdin=subprocess.PIPE, capture_output=True, timeout=TIMEOUT, cwd=tmp_path
    )
    frames = parse_frames(proc.stdout)
    check_frames(frames, proc.returncode)
    return Result(frames, proc.returncode, proc.stderr)
