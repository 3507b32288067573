"""The output limit's book-keeping, frame by frame: a table."""

from __future__ import annotations

import pytest

from crucible_jupyter.dispatcher.limits import ERROR_ROOM, OutputBudget, fit_stream


def stream(text: str) -> tuple[str, dict]:
    return ("stream", {"name": "stdout", "text": text})


ERROR = ("error", {"ename": "E", "evalue": "", "traceback": []})
DISPLAY = ("display_data", {"data": {"text/plain": "x"}, "metadata": {}})


@pytest.mark.parametrize(
    ("limit", "frames", "published", "notices", "kept", "dropped", "truncated"),
    [
        # under the limit: everything passes, counted with its size
        (100, [(stream("a"), 30), (DISPLAY, 40)], [stream("a"), DISPLAY], 0, 70, 0, False),
        # exactly at the limit: still kept
        (100, [(stream("a"), 100)], [stream("a")], 0, 100, 0, False),
        # the stream frame that crosses keeps the head that fits (20 bytes of fields)
        (30, [(stream("0123456789abcdef"), 36)], [stream("0123456789")], 1, 30, 6, True),
        # a display that crosses is dropped whole, and so is everything after it
        (30, [(DISPLAY, 40), (stream("a"), 21)], [], 1, 0, 61, True),
        # nothing of the crossing stream fits: dropped, notice once
        (30, [(stream("ab"), 25), (stream("cdefgh"), 26)], [stream("ab")], 1, 25, 26, True),
        # once cut, an error still passes (it names the failure); more text does not
        (30, [(stream("x" * 40), 60), (ERROR, 50), (stream("y"), 21)],
         [stream("x" * 10), ERROR], 1, 80, 51, True),
        # errors pass up to ERROR_ROOM beyond the limit, then they are dropped too
        (10, [(ERROR, ERROR_ROOM), (ERROR, 11)], [ERROR], 1, ERROR_ROOM, 11, True),
    ],
)  # fmt: skip
def test_admit(limit, frames, published, notices, kept, dropped, truncated):
    budget = OutputBudget(limit)
    out, due = [], 0
    for frame, size in frames:
        shown, notice = budget.admit(frame, size)
        if shown is not None:
            out.append(shown)
        due += notice
    assert out == published
    assert due == notices
    assert (budget.kept, budget.dropped, budget.truncated) == (kept, dropped, truncated)


def test_once_cut_frames_that_cannot_be_errors_are_not_parsed():
    budget = OutputBudget(10)
    assert not budget.skips_unparsed(50, may_be_error=False)  # not cut yet: parse it
    budget.admit(("display_data", {}), 50)
    assert budget.cut
    assert budget.skips_unparsed(7, may_be_error=False)
    assert not budget.skips_unparsed(7, may_be_error=True)
    assert budget.dropped == 57


def test_lost_bytes_are_counted():
    budget = OutputBudget(10)
    budget.lost(1000)
    assert (budget.kept, budget.dropped, budget.truncated, budget.cut) == (0, 1000, True, False)


@pytest.mark.parametrize(
    ("text", "size", "room", "expected"),
    [
        ("hello", 25, 23, ("hel", 23)),
        ("hello", 25, 20, None),  # only the fields fit
        ("héllo", 26, 22, ("h", 21)),  # a character is never split
        ("hello", 25, 100, ("hello", 25)),
    ],
)
def test_fit_stream(text, size, room, expected):
    got = fit_stream(stream(text), size, room)
    assert (got and (got[0]["text"], got[1])) == (expected or None)


def test_fit_stream_only_cuts_stream_text():
    assert fit_stream(DISPLAY, 40, 39) is None
