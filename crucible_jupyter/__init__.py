"""crucible_jupyter: run notebook cells as isolated, recorded, live-streaming executions.

Extension points:

- Jupyter server extension ``crucible`` (:class:`crucible_jupyter.server.CrucibleApp`),
  enabled on install through ``jupyter_server_config.d``.
- IPython extension: ``%load_ext crucible_jupyter`` registers the ``%%crucible`` cell magic
  and the ``%crucible`` line magic (:mod:`crucible_jupyter.magic`).
- JupyterLab extension ``crucible-jupyter`` (sources in ``labextension/``): the execution
  history panel and the queue in the status bar, installed with the package.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["__version__"]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The server extension this package provides (read by jupyter_server)."""
    from .server import CrucibleApp

    return [{"module": "crucible_jupyter.server", "app": CrucibleApp}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built JupyterLab extension is (read by ``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "crucible-jupyter"}]


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%%crucible`` / ``%crucible`` magics in ``ipython``."""
    from .magic import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """Stop the embedded dispatcher (if one was started) when the extension is unloaded."""
    from .magic import unload_ipython_extension as _unload

    _unload(ipython)
