"""Backends by short name: the ``crucible_jupyter.backends`` entry point group.

A backend is a :class:`~.base.Backend` subclass registered as ``name = "module:Class"`` in that
group (``[project.entry-points."crucible_jupyter.backends"]`` in pyproject.toml), so a third
party adds one by installing a package, as JupyterHub's spawners are found. Classes are loaded
only when asked for: listing the names imports no backend.

The backends this package ships are also known from :data:`BUILTIN`, so they are found when
crucible runs from a source tree whose entry points were never installed.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from ..errors import InvalidRequest

if TYPE_CHECKING:
    from .base import Backend

GROUP = "crucible_jupyter.backends"
#: The backends shipped with this package (what pyproject.toml registers), by name.
BUILTIN = {
    "local": "crucible_jupyter.backends.local:CrucibleLocalBackend",
    "kubernetes": "crucible_jupyter.backends.kubernetes:CrucibleKubernetesBackend",
}


def _registered() -> dict[str, EntryPoint]:
    """Every backend by name: the shipped ones, then the installed group (which wins)."""
    found = {name: EntryPoint(name, value, GROUP) for name, value in BUILTIN.items()}
    found.update({ep.name: ep for ep in entry_points(group=GROUP)})
    return found


def installed_backends() -> list[str]:
    """Names of every known backend, sorted."""
    return sorted(_registered())


def load_backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``; InvalidRequest (400, field ``backend``)
    naming the known backends when there is none."""
    found = _registered()
    if name not in found:
        raise InvalidRequest(
            f"backend {name!r} is not installed; known backends: {', '.join(sorted(found))}",
            field="backend",
        )
    return found[name].load()


def backend_classes() -> list[type[Backend]]:
    """The class of every known backend, for settings help; one that fails to load (a
    broken third-party package) is left out rather than hide the others."""
    classes = []
    for name in installed_backends():
        try:
            classes.append(load_backend_class(name))
        except Exception:  # noqa: BLE001 -- any failure of someone else's package: leave it out
            continue
    return classes
