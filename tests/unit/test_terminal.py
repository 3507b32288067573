"""What the `crucible` command writes: escaping for terminals, and an output that never blocks."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest

from crucible_jupyter.terminal import UNSAFE, Output, dumps, escape


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),  # clipboard
        ("\x1b[8m", "\\x1b[8m"),  # conceal
        ("\x9b2J\x9d0;t\x9c", "\\x9b2J\\x9d0;t\\x9c"),  # 8-bit CSI, OSC, ST
        ("a\x00b\x7fc\x08", "a\\x00b\\x7fc\\x08"),
        (
            "\u202eevil\u202c \u2066\u2069 \u200e\u200f\u061c",
            "\\u202eevil\\u202c \\u2066\\u2069 \\u200e\\u200f\\u061c",
        ),
        ("tab\tand\nnewline stay, é ü 中 too", "tab\tand\nnewline stay, é ü 中 too"),
        ("bar 10%\rbar 20%", "bar 10%\\x0dbar 20%"),
    ],
)
def test_escape(raw, shown):
    assert escape(raw) == shown


def test_a_carriage_return_in_stream_text_stays():
    assert escape("bar 10%\rbar 20%\x1b[K", keep_cr=True) == "bar 10%\rbar 20%\\x1b[K"


def test_json_is_exact_and_safe_on_a_terminal():
    value = {"text": "".join(map(chr, range(0x2070))), "\x1b]0;k": ["\x7f\u202e"]}
    text = dumps(value)
    assert json.loads(text) == value
    assert not re.search(f"[{UNSAFE}]", text)


def _on_a_pty(write, **kw) -> str:
    """Everything ``write(output)`` puts on a new pseudo-terminal (CRLF turned back into LF)."""
    master, slave = os.openpty()
    try:
        write(Output(slave, slave, **kw))
    finally:
        os.close(slave)
    data = b""
    try:
        while chunk := os.read(master, 65536):
            data += chunk
    except OSError:  # EIO: the other end is closed and everything was read
        pass
    finally:
        os.close(master)
    return data.decode().replace("\r\n", "\n")


def test_own_lines_start_on_a_fresh_line_and_are_styled_on_a_terminal():
    def write(output: Output) -> None:
        output.cell("stderr", "half a line\r", keep_cr=True)
        output.line("failed: X\x1b[2K", tone="bad")
        output.cell("stdout", "[crucible] succeeded\x1b[1;32m\n")
        output.line("succeeded", tone="ok")

    assert _on_a_pty(write, colour=True) == (
        "half a line\r\n\x1b[1;31m[crucible] failed: X\\x1b[2K\x1b[0m\n"
        "[crucible] succeeded\\x1b[1;32m\n"
        "\x1b[1;32m[crucible] succeeded\x1b[0m\n"
    )


def test_no_colour_keeps_bold():
    screen = _on_a_pty(lambda output: output.line("failed", tone="bad"), colour=False)
    assert screen == "\x1b[1m[crucible] failed\x1b[0m\n"


def test_a_pipe_nobody_reads_never_blocks_the_writer():
    """Writes return at once; past the buffer they are dropped and counted; the notice and
    crucible's own lines still reach stderr; close gives up on the silent reader."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    output = Output(out_w, err_w, background=True, limit=256 << 10)
    output.hint = "ID"
    done = threading.Event()

    def flood() -> None:
        for _ in range(64):  # 4 MiB into a 64 KiB pipe + 256 KiB buffer
            output.cell("stdout", "x" * (64 << 10))
        output.line("timed_out: timed out after 3 s", tone="bad")
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(30), "a write blocked on a pipe nobody reads"
    output.close(stall=0.5)
    said = os.read(err_r, 65536).decode()
    for fd in (out_r, out_w, err_r, err_w):
        os.close(fd)
    assert "[crucible] timed_out: timed out after 3 s\n" in said
    assert "of output were not shown here: the terminal or pipe did not keep up; see" in said
    assert "of output were not shown: the terminal or pipe took none of it for 0.5 s" in said
    assert "`crucible show ID`" in said


def test_a_reader_that_left_is_let_go():
    out_r, out_w = os.pipe()
    os.close(out_r)
    err_r, err_w = os.pipe()
    output = Output(out_w, err_w, background=True)
    output.cell("stdout", "nobody\n")
    output.line("succeeded", tone="ok")
    output.close(stall=30)  # returns at once: the reader is gone, nothing waits for it
    assert os.read(err_r, 65536) == b"[crucible] succeeded\n"
    for fd in (out_w, err_r, err_w):
        os.close(fd)
