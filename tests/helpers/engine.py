"""Cells through a real dispatcher: submit, follow, and read the events back."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crucible_jupyter.dispatcher import Dispatcher
    from crucible_jupyter.models import Event, Execution


async def run_cell(d: Dispatcher, code: str, **request) -> tuple[Execution, list[Event]]:
    """Submit ``code``, follow it live to the end; the final record and every event seen."""
    execution = await d.submit({"code": code, **request})
    events = [e async for e in d.subscribe(execution.id)]
    return await d.wait(execution.id), events


def stream_text(events: list[Event], name: str | None = None) -> str:
    """All stream text (of one stream, if named), in order."""
    return "".join(
        e.data["text"]
        for e in events
        if e.type == "stream" and (name is None or e.data["name"] == name)
    )


def statuses(events: list[Event]) -> list[str]:
    """The status values in order."""
    return [e.data["status"] for e in events if e.type == "status"]
