"""The dispatcher: the one in-process API every surface uses (see ``api.py`` for a tour)."""

from .core import CrucibleDispatcher, Dispatcher

__all__ = ["CrucibleDispatcher", "Dispatcher"]
