"""Fixtures for the engine tests: a real dispatcher on the real local sandbox (helpers to run
cells through it: tests.helpers.engine)."""

from __future__ import annotations

import pytest

from crucible_jupyter.dispatcher import Dispatcher


@pytest.fixture
async def dispatcher(make_dispatcher) -> Dispatcher:
    """A dispatcher on SQLite with the default local sandbox."""
    return await make_dispatcher()
