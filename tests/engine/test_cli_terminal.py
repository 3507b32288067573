"""The `crucible` command facing hostile cell output: in a real pseudo-terminal, and with a pipe
nobody reads (issue 12, items 5 and 6). The CLI runs as a real process on the real sandbox."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

GUARD = 60  # seconds: a run that takes longer than this is stuck

# what a cell writes to take over the reader's terminal, then a forged status line; it fails
HOSTILE = r"""
import sys
import termios
sys.stdout.write("clip\x1b]52;c;cm0gLXJmIH4=\x07 title\x1b]0;owned\x07\n")
sys.stdout.flush()
sys.stderr.write("conceal\x1b[8m secret \x1b[0m up\x1b[2A csi8\x9b2J del\x7f nul\x00 bell\x07\n")
sys.stderr.write("bidi \u202egnp.exe\u202c iso \u2067x\u2069 marks \u200e\u200f\u061c\n")
sys.stderr.write("[crucible] succeeded in 0.01 s\n")
sys.stderr.flush()
display({"text/plain": "plain\x1b[31mred\x9d8;;http://x\x9c", "x/\x1b[2Jmime": "x"}, raw=True)
raise ValueError("\x1b]0;reason\x07\u202e")
"""

# what must never reach a terminal raw (crucible's own SGR styles are removed before this check)
RAW = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
OWN_STYLES = re.compile(r"\x1b\[(?:1|1;3[12]|0)m")


def cli(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "crucible_jupyter.cli", "--db-url", url, *args]


def run_in_pty(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a new pseudo-terminal; its exit code and every
    byte it wrote there (decoded as UTF-8, the terminal's CRLF turned back into LF)."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    os.close(slave)
    data = bytearray()
    deadline = time.monotonic() + GUARD
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end closed it
                break
            if not chunk:
                break
            data += chunk
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)
    return code, data.decode("utf-8").replace("\r\n", "\n")


def test_a_cell_cannot_drive_the_terminal(tmp_path):
    url = f"sqlite:///{tmp_path}/crucible.db"
    cell = tmp_path / "cell.py"
    cell.write_text(HOSTILE)
    code, screen = run_in_pty(cli(url, "run", str(cell)))
    assert code == 1, screen
    bare = OWN_STYLES.sub("", screen)
    assert not RAW.findall(bare), RAW.findall(bare)
    # shown, escaped: what the cell wrote stays visible
    for shown in (
        r"clip\x1b]52;c;cm0gLXJmIH4=\x07",
        r"title\x1b]0;owned\x07",
        r"\x1b[8m secret \x1b[0m",
        r"up\x1b[2A",
        r"csi8\x9b2J",
        r"del\x7f nul\x00 bell\x07",
        r"bidi \u202egnp.exe\u202c iso \u2067x\u2069 marks \u200e\u200f\u061c",
        r"plain\x1b[31mred\x9d8;;http://x\x9c",
        # an unknown type is removed by the output policy, which names it escaped as JSON
        r'output of type "x/\u001b[2Jmime" was removed',
    ):
        assert shown in bare, (shown, screen)
    # the forged line is plain text; crucible's own status is styled, comes last, and is true
    assert "\n[crucible] succeeded in 0.01 s\n" in screen
    real = re.search(
        r"\x1b\[1;31m\[crucible\] failed: ValueError: ([^\x1b]*) in [\d.]+ s\x1b\[0m\n$", screen
    )
    assert real, screen[-400:]
    assert real.group(1) == r"\x1b]0;reason\x07\u202e"
    assert "\x1b[1;32m" not in screen  # nothing said "succeeded" in crucible's own style

    # `crucible show` in a terminal: escaped the same way
    (record,) = json.loads(
        subprocess.run(cli(url, "history", "--json"), capture_output=True, check=True).stdout
    )["executions"]
    code, shown = run_in_pty(cli(url, "show", record["id"]))
    assert code == 0, shown
    assert not RAW.findall(shown), RAW.findall(shown)
    assert r"reason:      ValueError: \x1b]0;reason\x07\u202e" in shown
    assert r"\x1b[8m secret" in shown
    assert r"\u202egnp.exe" in shown

    # --json stays exact (JSON escapes the characters itself, so a terminal is safe too)
    exact = json.loads(
        subprocess.run(
            cli(url, "show", record["id"], "--json"), capture_output=True, check=True
        ).stdout
    )
    stderr = "".join(
        e["text"] for e in exact["events"] if e["type"] == "stream" and e["name"] == "stderr"
    )
    assert "conceal\x1b[8m secret \x1b[0m up\x1b[2A csi8\x9b2J del\x7f nul\x00 bell\x07\n" in stderr
    assert "bidi \u202egnp.exe\u202c" in stderr
    assert exact["reason"] == "ValueError: \x1b]0;reason\x07\u202e"
    code, lines = run_in_pty(cli(url, "run", "--json", str(cell)))
    assert code == 1, RAW.findall(lines)
    assert not RAW.findall(lines), RAW.findall(lines)
    events = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    assert any(
        e["type"] == "stream" and e["text"].startswith("clip\x1b]52;c;cm0gLXJmIH4=\x07")
        for e in events
    ), events


def test_output_to_a_file_stays_exact(tmp_path):
    """Redirected to a file (not a terminal), a cell's output is written as it is."""
    url = f"sqlite:///{tmp_path}/crucible.db"
    text = "a\x1b[1mb\u202ec\rd\n"
    done = subprocess.run(
        cli(url, "run", "-"),
        input=f"print({text!r}, end='')".encode(),
        capture_output=True,
        timeout=GUARD,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == text


@pytest.mark.parametrize("same", [False, True], ids=["stdout-unread", "stdout-and-stderr-unread"])
def test_timeout_does_not_wait_for_a_reader(tmp_path, same):
    """A cell prints 4 MiB, then spins; the CLI's stdout is a pipe nobody reads. The timeout
    still ends the cell, it is recorded timed out, and the CLI ends (it gave up on the pipe)."""
    url = f"sqlite:///{tmp_path}/crucible.db"
    err_path = Path(tmp_path / "stderr.txt")
    read_end, write_end = os.pipe()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cli(url, "run", "--timeout", "3", "-"),
            stdin=subprocess.PIPE,
            stdout=write_end,
            stderr=write_end if same else err,
            start_new_session=True,
        )
    os.close(write_end)
    try:
        proc.stdin.write(b"for i in range(65536):\n    print('x' * 63)\nwhile True:\n    pass\n")
        proc.stdin.close()
        code = proc.wait(GUARD)  # nobody ever reads read_end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(read_end)
    assert code == 124, err_path.read_text()
    (record,) = json.loads(
        subprocess.run(cli(url, "history", "--json"), capture_output=True, check=True).stdout
    )["executions"]
    assert record["status"] == "timed_out", record
    assert record["reason"] == "timed out after 3 s"
    if not same:
        said = err_path.read_text()
        assert "[crucible] timed_out: timed out after 3 s" in said, said
        # what did not fit in its buffer was dropped, and said; what was left at the end too
        assert "of output were not shown here: the terminal or pipe did not keep up" in said
        assert "of output were not shown: the terminal or pipe took none of it" in said
        assert f"see `crucible show {record['id']}`" in said


def test_timeout_does_not_wait_for_a_paused_terminal(tmp_path):
    """The same cell, in a terminal the user paused (Ctrl-S) before it printed anything."""
    url = f"sqlite:///{tmp_path}/crucible.db"
    cell = tmp_path / "cell.py"
    cell.write_text("for i in range(65536):\n    print('x' * 63)\nwhile True:\n    pass\n")
    master, slave = os.openpty()
    assert termios.tcgetattr(slave)[0] & termios.IXON  # flow control on, as in a terminal
    os.write(master, b"\x13")  # Ctrl-S: the terminal stops taking output
    proc = subprocess.Popen(
        cli(url, "run", "--timeout", "3", str(cell)),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        code = proc.wait(GUARD)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.write(master, b"\x11")  # Ctrl-Q
        os.close(master)
    assert code == 124
    (record,) = json.loads(
        subprocess.run(cli(url, "history", "--json"), capture_output=True, check=True).stdout
    )["executions"]
    assert record["status"] == "timed_out"
    assert record["reason"] == "timed out after 3 s"


RESULT = r"""
class Shown:
    def __repr__(self):
        return "result\x1b]0;owned\x07\u202e"
print("out\x1b[8m")
Shown()
"""


@pytest.mark.parametrize("cell", [HOSTILE, RESULT], ids=["fails", "result"])
def test_the_magic_in_terminal_ipython_cannot_drive_the_terminal(tmp_path, cell):
    """`%%crucible` in terminal IPython (no Jupyter: an embedded dispatcher) prints the cell's
    streams, displays, result, status line and traceback to the user's terminal: escaped."""
    magic = (
        "get_ipython().run_line_magic('load_ext', 'crucible_jupyter');"
        f"get_ipython().run_cell_magic('crucible', '--timeout 30', {cell!r})"
    )
    ipython = [
        sys.executable,
        "-m",
        "IPython",
        "--no-banner",
        "--colors=NoColor",
        "--simple-prompt",
    ]
    url = f"sqlite:///{tmp_path / 'magic.db'}"
    _, out = run_in_pty([*ipython, "-c", magic], env={"CRUCIBLE_DB_URL": url})
    assert "\\x1b]0;" in out, out  # the cell's text is there, shown escaped
    assert not RAW.findall(out), out
    if cell is HOSTILE:
        assert "plain\\x1b[31mred" in out
        assert "ValueError: \\x1b]0;reason" in out
    else:
        assert "result\\x1b]0;owned\\x07\\u202e" in out
        assert "out\\x1b[8m" in out
