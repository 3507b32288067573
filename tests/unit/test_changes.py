"""The dispatcher's change feed: every watcher hears every notice, a slow one loses notices
(and is told so) instead of growing memory, close ends every watch."""

from __future__ import annotations

from crucible_jupyter.dispatcher.channel import Changes


def drain(q) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_every_watcher_hears_every_notice_then_the_end():
    changes = Changes()
    a, b = changes.watch(), changes.watch()
    changes.notify({"id": "1", "status": "queued"})
    changes.unwatch(b)
    changes.notify({"id": "1", "status": "running"})
    changes.close()
    assert drain(a) == [{"id": "1", "status": "queued"}, {"id": "1", "status": "running"}, None]
    assert drain(b) == [{"id": "1", "status": "queued"}]
    assert drain(changes.watch()) == [None]  # a watch after close ends at once


def test_a_watcher_that_does_not_read_loses_notices_and_is_told():
    changes = Changes(maxsize=4)
    slow = changes.watch()
    for i in range(10):
        changes.notify({"id": str(i)})
    assert slow.qsize() == 3  # bounded
    kept = drain(slow)
    changes.notify({"id": "late"})
    assert kept == [{"id": "0"}, {"id": "1"}, {"id": "2"}]
    assert drain(slow) == [{"overflow": True}, {"id": "late"}]
