"""Where crucible's own configuration files are read, for the CLI and ``crucible serve``."""

from __future__ import annotations

import os

from traitlets.config import Config


def load_config(db_url: str | None) -> Config:
    """Configuration from ``crucible_config.{py,json}`` on the Jupyter config path (later
    paths first, so the user's own files win), with ``db_url`` on top when given."""
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config.loader import JSONFileConfigLoader, PyFileConfigLoader

    config = Config()
    for path in reversed(jupyter_config_path()):
        for name, loader in (
            ("crucible_config.json", JSONFileConfigLoader),
            ("crucible_config.py", PyFileConfigLoader),
        ):
            if os.path.isfile(os.path.join(path, name)):
                config.merge(loader(name, path=path).load_config())
    if db_url:
        config.CrucibleDispatcher.db_url = db_url
    return config
