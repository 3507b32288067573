"""Runner lines are checked, never trusted."""

from __future__ import annotations

from crucible_jupyter.backends.base import read_lines
from crucible_jupyter.dispatcher import frames


def test_known_frames_are_cleaned():
    assert frames.parse(b'{"type":"stream","name":"stdout","text":"hi"}') == (
        "stream",
        {"name": "stdout", "text": "hi"},
    )
    assert frames.parse(b'{"type":"stream","name":"evil","text":5}') == (
        "stream",
        {"name": "stdout", "text": ""},
    )
    kind, payload = frames.parse(b'{"type":"error","ename":"E","evalue":"v","traceback":["a",1]}')
    assert (kind, payload["traceback"]) == ("error", ["a"])
    assert frames.parse(b'{"type":"end","exit_code":0}') is None
    assert frames.parse(b"") is None


def test_other_lines_become_stderr_text():
    assert frames.parse(b"Traceback (most recent call last):") == (
        "stream",
        {"name": "stderr", "text": "Traceback (most recent call last):\n"},
    )
    assert frames.parse(b"[1, 2]")[1]["name"] == "stderr"
    assert frames.parse(b'{"type":"status","status":"succeeded"}')[1]["name"] == "stderr"
    assert frames.parse(b"\xff\xfe")[1]["text"] == "\ufffd\ufffd\n"
    assert frames.parse(b"[" * 100000)[1]["name"] == "stderr"


async def test_read_lines_bounds_memory():
    import asyncio

    reader = asyncio.StreamReader()
    reader.feed_data(b"short\n" + b"x" * 100 + b"\nlast")
    reader.feed_eof()
    got = [item async for item in read_lines(reader, max_line=10, chunk=7)]
    assert got == [(b"short", 0), (b"x" * 10, 90), (b"last", 0)]
