"""``crucible serve``: the dispatcher as a standalone JupyterHub service (see :mod:`.app`)."""

from __future__ import annotations

from .app import CrucibleService, main, run

__all__ = ["CrucibleService", "main", "run"]
