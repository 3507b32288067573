"""The ``crucible`` Jupyter server extension: dispatcher, REST + WebSocket API, kernel wiring."""

from __future__ import annotations

from .app import CrucibleApp

__all__ = ["CrucibleApp"]
