"""Fixtures for the engine tests: a real dispatcher on the real local sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from traitlets.config import Config

from crucible_jupyter.dispatcher import Dispatcher
from crucible_jupyter.models import Event, Execution

MakeDispatcher = Callable[..., Awaitable[Dispatcher]]


@pytest.fixture
async def make_dispatcher(tmp_path: Path) -> AsyncIterator[MakeDispatcher]:
    """Start dispatchers with extra config (``CrucibleDispatcher`` traits as keywords,
    ``local={...}`` for ``CrucibleLocalBackend``); all are stopped at the end."""
    started: list[Dispatcher] = []

    async def make(db_url: str | None = None, local: dict | None = None, **traits) -> Dispatcher:
        config = Config()
        config.CrucibleDispatcher.db_url = db_url or f"sqlite:///{tmp_path}/crucible.db"
        for k, v in traits.items():
            setattr(config.CrucibleDispatcher, k, v)
        for k, v in (local or {}).items():
            setattr(config.CrucibleLocalBackend, k, v)
        d = Dispatcher(config=config)
        await d.start()
        started.append(d)
        return d

    yield make
    for d in reversed(started):
        await d.stop()


@pytest.fixture
async def dispatcher(make_dispatcher: MakeDispatcher) -> Dispatcher:
    """A dispatcher on SQLite with the default local sandbox."""
    return await make_dispatcher()


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
