"""A subscriber that stops reading while its cell floods (issue 12, item 6): the cell still
times out on time, the subscriber's memory stays bounded, and once it reads again it gets
every event, exactly once, in order (what it missed comes from storage)."""

from __future__ import annotations

import asyncio

from crucible_jupyter.dispatcher.channel import Channel
from crucible_jupyter.models import Status

# many separate events (a flush, then a pause longer than the runner's 5 ms merge), then a spin
CELL = """
import time
for i in range(150):
    print(f"line {i}", flush=True)
    time.sleep(0.01)
while True:
    pass
"""


async def test_a_subscriber_that_stops_reading_misses_nothing_and_holds_nothing_up(
    dispatcher, monkeypatch
):
    monkeypatch.setattr(Channel, "subscriber_limit", 16)
    execution = await dispatcher.submit({"code": CELL, "timeout": 3})
    stream = dispatcher.subscribe(execution.id)
    first = await anext(stream)
    assert first.seq == 0
    held = []

    async def watch() -> None:  # how much the subscription holds while nobody reads it
        while (channel := dispatcher._rec.channels.get(execution.id)) and not channel.closed:
            held.extend(len(s.events) for s in channel.subscribers)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    final = await dispatcher.wait(execution.id)  # not reading `stream` meanwhile
    await watcher
    assert final.status is Status.TIMED_OUT
    assert final.reason == "timed out after 3 s"
    assert held
    assert max(held) <= 16
    rest = [event async for event in stream]
    events = [first, *rest]
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.to_dict() for e in events] == [
        e.to_dict() for e in await dispatcher.events(execution.id)
    ]
    text = "".join(e.data["text"] for e in events if e.type == "stream")
    assert text == "".join(f"line {i}\n" for i in range(150))
    assert events[-1].data["status"] == "timed_out"
