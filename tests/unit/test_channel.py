"""The live fan-out of one execution's events: a subscriber that does not read is bounded."""

from __future__ import annotations

from crucible_jupyter.dispatcher.channel import BEHIND, Channel


async def test_a_subscriber_that_does_not_read_is_bounded_then_told_it_is_behind():
    channel = Channel("e")
    channel.subscriber_limit = 100
    idle, reader = channel.subscribe(), channel.subscribe()
    got = []
    for i in range(1000):
        channel.publish("stream", {"name": "stdout", "text": f"{i}\n"})
        got.append(await reader.get())
        assert len(idle.events) <= 100  # never more held for it than the bound
    assert [e.seq for e in got] == list(range(1000))  # one that keeps up misses nothing
    assert await idle.get() is BEHIND  # where it lost events, it is told, once
    channel.publish("stream", {"name": "stdout", "text": "live\n"})
    assert (await idle.get()).data["text"] == "live\n"  # then it follows live events again
    assert (await reader.get()).seq == 1000
    channel.close()
    assert await idle.get() is None
    assert await reader.get() is None


async def test_the_bound_counts_bytes_too():
    channel = Channel("e")
    channel.subscriber_bytes = 1 << 20
    idle = channel.subscribe()
    for _ in range(20):
        channel.publish("stream", {"name": "stdout", "text": "x" * (256 << 10)})
        assert idle.bytes <= 1 << 20
    assert idle.behind
    assert not idle.events


async def test_what_was_read_leaves_the_bound():
    channel = Channel("e")
    channel.subscriber_limit = 2
    sub = channel.subscribe()
    for i in range(10):
        channel.publish("display_data", {"data": {"text/plain": str(i)}})
        assert (await sub.get()).seq == i
    assert not sub.behind
    assert sub.bytes == 0
