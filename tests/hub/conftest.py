"""A real JupyterHub with crucible as a hub-managed service (``crucible serve``); the helpers
(start_hub, user_server, Kernel, ...) are in tests.helpers.hub.

``hub`` (session scope) starts ``jupyterhub`` from .venv with the dummy authenticator and the
real configurable-http-proxy (installed by ``dev/setup --tests`` into ``.venv/chp``), in a
temporary directory, listening on 127.0.0.1 only. Its configuration is the one the README
documents: the ``crucible`` service (command ``crucible serve``, local bubblewrap backend,
SQLite in the temporary directory), ``custom:crucible:admin`` declared, the ``user`` role
granted ``access:services!service=crucible``, the ``crucible-admin`` role granting the custom
scope to the user ``admin``. A control service creates the users (alice, bob, admin and
the special ones of ``USERS``) and their API tokens through the hub's REST API, plus a token
of alice's without the access scope. Everything reaches crucible through the hub's proxy at
``/services/crucible/``. User servers (started by tests with :func:`user_server`) run in
remote mode, except carol's (a service on ``Hub.spare_port`` that tests start and kill) and
the user ``embedded``'s (no service: an embedded dispatcher, for the benchmark).

Missing jupyterhub or configurable-http-proxy is a failure, not a skip: ``dev/test`` installs
both.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.hub import Hub, start_hub


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A running JupyterHub with the crucible service; stopped at the end of the session."""
    with start_hub(tmp_path_factory.mktemp("hub")) as running:
        yield running
