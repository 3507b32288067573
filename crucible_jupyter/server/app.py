"""The ``crucible`` Jupyter server extension: the dispatcher inside the Jupyter server.

It promises:

- one :class:`~crucible_jupyter.dispatcher.Dispatcher` per server, started with the server
  (or on the first request, whichever comes first) and stopped with it;
- the REST + WebSocket API under ``{base_url}crucible/api/`` (see :mod:`.handlers`);
- kernels the server starts can reach that API with no configuration: the server's URL and a
  dedicated credential are put in the environment kernels inherit (``CRUCIBLE_SERVER_URL``,
  ``CRUCIBLE_TOKEN``); the credential only opens the crucible API, as the server's user; they
  also get the dispatcher's ``trusted_output_types`` (``CRUCIBLE_TRUSTED_OUTPUT_TYPES``), so
  the magic and the kernel apply the same output policy before they display;
- while anything is queued or running, the server counts as active, so idle culling
  (``ServerApp.shutdown_no_activity_timeout``, JupyterHub's culler) does not stop it mid-cell;
- in remote mode (``service_url`` set, as in a JupyterHub user server) there is no dispatcher
  and no database here: the same API forwards every call to the hub's crucible service with
  the server's JupyterHub token (:mod:`.remote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from typing import Any

from jupyter_server._tz import utcnow
from jupyter_server.auth.identity import User
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from traitlets import Bool, Float, Int, Unicode, default

from .._version import __version__
from ..backends.local import CrucibleLocalBackend
from ..backends.registry import backend_classes
from ..dispatcher import Dispatcher
from ..errors import Unavailable
from ..output_policy import ENV_TRUSTED_TYPES, trusted_types_from_env
from ..protocol import ENV_SERVER_URL, ENV_SERVICE_URL, ENV_TOKEN, env_text, local_user
from .identity import KernelTokenIdentity


class CrucibleApp(ExtensionApp):
    """Jupyter server extension ``crucible``: dispatcher, REST/WebSocket API, kernel wiring."""

    #: set by jupyter_server before any method below runs (ExtensionApp types it Optional)
    serverapp: ServerApp

    name = "crucible"
    description = "Run notebook cells as isolated, recorded executions (crucible_jupyter)."
    version = __version__
    load_other_extensions = True
    # `jupyter crucible --help-all` lists these; `jupyter server --help-all` gets them (and every
    # installed backend) through crucible_jupyter/_server_help.py.
    classes = [ServerApp, Dispatcher, CrucibleLocalBackend]

    max_body_bytes = Int(
        8 << 20,
        help="""Largest request body (bytes) the crucible API reads. Larger bodies are refused
        with 413 before any parsing. The code-size limit itself is the dispatcher's
        (CrucibleDispatcher); this only bounds the JSON envelope around it.""",
    ).tag(config=True)

    max_page_size = Int(
        500,
        help="Largest `limit` a client may ask for when listing executions (GET executions).",
    ).tag(config=True)

    kernel_env = Bool(
        True,
        help="""Hand kernels started by this server the crucible API URL and credential
        (CRUCIBLE_SERVER_URL, CRUCIBLE_TOKEN), so the %%crucible magic and the crucible kernel
        reach this server's dispatcher with no configuration. Kernels inherit them from the
        server's environment.""",
    ).tag(config=True)

    kernel_token = Unicode(
        help="""Credential handed to kernels (CRUCIBLE_TOKEN). It authenticates requests to the
        crucible API only (header X-Crucible-Token), as `kernel_user`. Random per server start
        unless set; set it only to share it with a client started outside this server.""",
    ).tag(config=True)

    @default("kernel_token")
    def _default_kernel_token(self) -> str:
        return secrets.token_urlsafe(32)

    kernel_user = Unicode(
        help="""Username recorded for executions submitted with the kernel credential (from
        kernels of this server). Default: $JUPYTERHUB_USER when running under JupyterHub,
        else the operating-system user running the server.""",
    ).tag(config=True)

    @default("kernel_user")
    def _default_kernel_user(self) -> str:
        return local_user()

    server_url = Unicode(
        help="""URL kernels use to reach this server (CRUCIBLE_SERVER_URL), including the
        base_url. Default: the server's own connection URL. Set it when kernels run elsewhere
        (for example behind a gateway).""",
    ).tag(config=True)

    activity_interval = Float(
        30.0,
        help="""Seconds between server-activity updates while executions are queued or running.
        Keep it well under ServerApp.shutdown_no_activity_timeout and any culler's timeout.""",
    ).tag(config=True)

    start_timeout = Float(
        60.0,
        help="Seconds a request waits for the dispatcher to finish starting before a 503.",
    ).tag(config=True)

    service_url = Unicode(
        help="""URL of the hub's crucible service (`crucible serve`), e.g.
        http://crucible:8576/services/crucible/. When set (remote mode), this server runs no
        dispatcher and opens no database: its crucible API forwards every call and WebSocket
        to {service_url}api/ with service_token, so cells run, queue and are recorded there,
        owned by this server's JupyterHub user. Env: CRUCIBLE_SERVICE_URL.""",
    ).tag(config=True)

    @default("service_url")
    def _default_service_url(self) -> str:
        return env_text(ENV_SERVICE_URL, "")

    service_token = Unicode(
        help="""Token sent to the crucible service in remote mode. Default: the server's own
        JupyterHub token, $JUPYTERHUB_API_TOKEN (it needs the scope
        access:services!service=crucible: see c.Spawner.server_token_scopes).""",
    ).tag(config=True)

    @default("service_token")
    def _default_service_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    service_timeout = Float(
        120.0,
        help="""Seconds a forwarded request (remote mode) may take before it fails; also how
        long an execution's stream keeps trying to reach a service that went away mid-cell
        (restarting) before it closes with a reason.""",
    ).tag(config=True)

    @property
    def remote(self) -> bool:
        """True in remote mode (``service_url`` set)."""
        return bool(self.service_url)

    @property
    def service_api_url(self) -> str:
        """``{service_url}api/``: where remote mode sends the API's calls."""
        return self.service_url.rstrip("/") + "/api/"

    # -- lifecycle ------------------------------------------------------------------------------

    def initialize_settings(self) -> None:
        """Create the dispatcher (configured from ``c.CrucibleDispatcher``; none in remote mode)
        and wire the kernels."""
        self.dispatcher = None if self.remote else Dispatcher(parent=self, log=self.log)
        self._start_task: asyncio.Task | None = None
        self._activity_task: asyncio.Task | None = None
        self._identities: dict[int, KernelTokenIdentity] = {}
        self._saved_env: dict[str, str | None] = {}
        self.settings["crucible_dispatcher"] = self.dispatcher
        if self.kernel_env:
            self._export_kernel_env()
        self.log.info("crucible %s: API at %scrucible/api/", __version__, self.serverapp.base_url)
        if self.remote:
            self.log.info("crucible: remote mode, forwarding to %s", self.service_api_url)

    def initialize_handlers(self) -> None:
        """Register the crucible API routes."""
        from .handlers import default_handlers
        from .remote import remote_handlers

        self.handlers.extend(remote_handlers() if self.remote else default_handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Start the dispatcher as soon as the server's event loop runs."""
        if self.kernel_env and not self.server_url:
            self._export_kernel_env()  # the port is final now
        if self.remote:
            return
        try:
            await self.ready()
        except Unavailable as e:
            self.log.error("crucible dispatcher did not start: %s", e)

    async def ready(self) -> Any:
        """The started dispatcher; raises Unavailable (503) if it cannot start. A failed start
        (say, the database was not up yet) is retried by the next request."""
        if self.dispatcher is None:
            raise Unavailable("this server forwards crucible to a service (remote mode)")
        task = self._start_task
        if task is None or (task.done() and not task.cancelled() and task.exception()):
            task = self._start_task = asyncio.ensure_future(self._start())
        try:
            await asyncio.wait_for(asyncio.shield(task), self.start_timeout)
        except asyncio.TimeoutError:
            raise Unavailable("the crucible dispatcher is still starting; retry shortly") from None
        except Exception as e:  # whatever failed the start, the caller gets a 503 saying so
            raise Unavailable(f"the crucible dispatcher could not start: {e}") from e
        return self.dispatcher

    async def _start(self) -> None:
        assert self.dispatcher is not None  # ready() refuses remote mode before this
        await self.dispatcher.start()
        if self._activity_task is None:
            self._activity_task = asyncio.ensure_future(self._track_activity())

    async def _track_activity(self) -> None:
        """While executions are queued or running, mark the server active."""
        while True:
            try:
                self.touch_activity()
            except Exception:  # pragma: no cover - never let the loop die
                self.log.exception("crucible: could not record server activity")
            await asyncio.sleep(self.activity_interval)

    def touch_activity(self) -> None:
        """Record server activity now if the dispatcher has work in hand."""
        if getattr(self.dispatcher, "busy", False):
            now = utcnow()
            settings = self.serverapp.web_app.settings
            settings.setdefault("last_activity_times", {})["crucible"] = now
            settings["crucible_last_activity"] = now  # the server's `*_last_activity` hook

    async def stop_extension(self) -> None:
        """Stop the dispatcher (cancelling what runs) and undo the kernel environment."""
        if self._activity_task is not None:
            self._activity_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._activity_task
            self._activity_task = None
        if self._start_task is not None:
            # a failed start was reported by ready(); stop whatever did start regardless
            with contextlib.suppress(Exception):
                await self._start_task
            assert self.dispatcher is not None  # only ready() starts one, never in remote mode
            await self.dispatcher.stop()
            self._start_task = None
        self._restore_kernel_env()

    @property
    def api_root(self) -> str:
        """URL path of the API root, ``{base_url}crucible/api`` (no trailing slash)."""
        return url_path_join(self.serverapp.base_url, "crucible/api")

    # -- kernels ----------------------------------------------------------------------------------

    def kernel_api_url(self) -> str:
        """The URL handed to kernels: ``server_url`` or the server's connection URL."""
        url = self.server_url or self.serverapp.connection_url
        return url if url.endswith("/") else url + "/"

    def _export_kernel_env(self) -> None:
        values = {
            ENV_SERVER_URL: self.kernel_api_url(),
            ENV_TOKEN: self.kernel_token,
            ENV_TRUSTED_TYPES: ",".join(
                self.dispatcher.trusted_output_types
                if self.dispatcher is not None
                else sorted(trusted_types_from_env())
            ),
        }
        for key, value in values.items():
            if key not in self._saved_env:
                self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value

    def _restore_kernel_env(self) -> None:
        for key, old in self._saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._saved_env.clear()

    def identity_for(self, inner: Any) -> KernelTokenIdentity:
        """``inner`` (the server's identity provider) extended with the kernel credential."""
        ident = self._identities.get(id(inner))
        if ident is None or ident._inner is not inner:
            user = User(username=self.kernel_user, name=self.kernel_user)
            ident = KernelTokenIdentity(inner, self.kernel_token, user)
            self._identities[id(inner)] = ident
        return ident

    def current_activity(self) -> dict[str, Any] | None:
        """What the dispatcher has in hand, for servers that ask extensions about activity."""
        if getattr(self, "dispatcher", None) is None or not getattr(self.dispatcher, "busy", False):
            return None
        return {"crucible": "executions queued or running"}


def crucible_classes() -> list[type]:
    """The configurable classes whose settings crucible's help lists and a generated config
    file holds: the extension app, the dispatcher, every installed backend. Used by
    ``jupyter crucible`` (:func:`main`) and ``jupyter server --help-all``
    (``crucible_jupyter/_server_help.py``)."""
    return [CrucibleApp, Dispatcher, *backend_classes()]


def main() -> None:
    """``jupyter crucible``: a Jupyter server with the crucible extension (``--help-all``
    lists every ``CrucibleApp``, ``CrucibleDispatcher`` and installed backend setting)."""
    CrucibleApp.classes = [ServerApp, *(c for c in crucible_classes() if c is not CrucibleApp)]
    CrucibleApp.launch_instance()
