"""``crucible serve``: one dispatcher for every user of a JupyterHub, as a hub service.

It promises:

* the crucible REST + WebSocket API and its OpenAPI document, the same as the Jupyter server
  extension's (one set of handlers, :func:`crucible_jupyter.server.handlers.routes`), under
  ``{prefix}api/`` (``prefix`` from ``$JUPYTERHUB_SERVICE_PREFIX``, e.g.
  ``/services/crucible/``), listening where ``$JUPYTERHUB_SERVICE_URL`` says when the hub
  manages the service;
* callers authenticated by JupyterHub (:mod:`.auth`): API tokens, and browsers logged in
  through the hub's OAuth (``{prefix}login``; such a login only reads); a hub that fails or
  stays silent for ``hub_timeout`` seconds is a 503; each user lists, reads, streams and
  cancels only their own executions, holders of ``admin_scope`` all of them;
* probes: ``{prefix}healthz`` (liveness) and ``{prefix}readyz`` (readiness: the dispatcher
  started and its database answers, and no shutdown has begun);
* SIGTERM (or SIGINT): readiness turns false and new submissions are refused (503) at once;
  reads and streams go on; cells that run get ``shutdown_grace_seconds`` to finish, then are
  ended with a reason that says so; queued cells stay queued in the database for the next
  start; everything is stored before the process exits.

Settings are traitlets (``crucible serve --help-all``), read from ``crucible_config.py`` on
the Jupyter config path, then ``--config FILE``, then the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import secrets
import signal
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubAuth, HubOAuth
from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Float, Int, Unicode, default, validate
from traitlets.config import Application

from .._version import __version__
from ..errors import Unavailable
from ..protocol import (
    ENV_ADMIN_SCOPE,
    ENV_COOKIE_SECRET,
    ENV_SHUTDOWN_GRACE_SECONDS,
    env_float,
    env_text,
)
from .auth import HubIdentity
from .handlers import service_routes


class CrucibleService(Application):
    """The standalone crucible dispatcher service (``crucible serve``)."""

    name = "crucible-serve"
    description = (
        "Serve the crucible API for every user of a JupyterHub: one dispatcher, one queue,"
        " one database; callers authenticated by the hub."
    )
    version = __version__

    aliases = {
        "config": "CrucibleService.config_file",
        "prefix": "CrucibleService.prefix",
        "bind-url": "CrucibleService.bind_url",
        "db-url": "CrucibleDispatcher.db_url",
        "backend": "CrucibleDispatcher.backend",
        "log-level": "Application.log_level",
    }

    config_file = Unicode(
        "", help="A Python or JSON config file read after crucible_config.py (optional)."
    ).tag(config=True)

    service_name = Unicode(
        help="""Name of this service in JupyterHub (c.JupyterHub.services). Tokens need
        access:services!service=<name>. Env: JUPYTERHUB_SERVICE_NAME (the hub sets it for
        services it manages). Default: crucible.""",
    ).tag(config=True)

    @default("service_name")
    def _default_service_name(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_NAME") or "crucible"

    prefix = Unicode(
        help="""URL path under which everything is served, with a trailing slash; the API is
        at {prefix}api/. Env: JUPYTERHUB_SERVICE_PREFIX (the hub sets it). Default:
        /services/<service_name>/, where the hub's proxy sends the service's requests.""",
    ).tag(config=True)

    @default("prefix")
    def _default_prefix(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or f"/services/{self.service_name}/"

    @validate("prefix")
    def _slashes(self, proposal: Any) -> str:
        value = "/" + str(proposal["value"]).strip("/") + "/"
        return value.replace("//", "/")

    bind_url = Unicode(
        help="""Where to listen, as http://HOST:PORT. Env: JUPYTERHUB_SERVICE_URL (the hub
        sets it from the service's `url`). Default: http://127.0.0.1:8576.""",
    ).tag(config=True)

    @default("bind_url")
    def _default_bind_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL") or "http://127.0.0.1:8576"

    admin_scope = Unicode(
        help="""JupyterHub scope whose holders see and cancel every user's executions (declare
        it with c.JupyterHub.custom_scopes and grant it through a role). Only the unfiltered
        scope in the token's own scopes counts. Empty: no admins. Env: CRUCIBLE_ADMIN_SCOPE.
        Default: custom:crucible:admin.""",
    ).tag(config=True)

    @default("admin_scope")
    def _default_admin_scope(self) -> str:
        return env_text(ENV_ADMIN_SCOPE, "custom:crucible:admin", empty_is_unset=False)

    auth_cache_seconds = Int(
        60,
        help="""Seconds the hub's answer about a token is reused (HubAuth.cache_max_age): a
        revoked token or a removed scope takes effect at most this late.""",
    ).tag(config=True)

    hub_timeout = Float(
        10.0,
        help="""Seconds the service waits for JupyterHub to answer about a token before it
        answers 503 (a hub that accepts connections but does not answer would otherwise hold
        each request for minutes).""",
    ).tag(config=True)

    shutdown_grace_seconds = Float(
        help="""On SIGTERM, seconds running cells get to finish before they are ended (with a
        reason saying so). Keep it under the orchestrator's own grace period (Kubernetes:
        terminationGracePeriodSeconds, 30 s by default). Env: CRUCIBLE_SHUTDOWN_GRACE_SECONDS.
        Default: 25.""",
    ).tag(config=True)

    @default("shutdown_grace_seconds")
    def _default_grace(self) -> float:
        return env_float(ENV_SHUTDOWN_GRACE_SECONDS, 25)

    cookie_secret = Unicode(
        help="""Hex key that signs the cookie of a browser's login (OAuth through the hub).
        Give every replica the same one, and keep it across restarts to keep browsers logged
        in. Env: CRUCIBLE_COOKIE_SECRET. Default: random at each start (a restart logs
        browsers out; tokens are not affected).""",
    ).tag(config=True)

    @default("cookie_secret")
    def _default_cookie_secret(self) -> str:
        return env_text(ENV_COOKIE_SECRET, "") or secrets.token_hex(32)

    @validate("cookie_secret")
    def _hex_key(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip()
        try:
            key = bytes.fromhex(value)
        except ValueError:
            key = b""
        if len(key) < 32:
            raise ValueError(
                "CrucibleService.cookie_secret (CRUCIBLE_COOKIE_SECRET) must be at least 32"
                " bytes as hex, e.g. the output of `openssl rand -hex 32`"
            )
        return value

    max_body_bytes = Int(
        8 << 20,
        help="""Largest request body (bytes) the API reads; larger ones are refused with 413.
        The code-size limit itself is CrucibleDispatcher.max_code_bytes.""",
    ).tag(config=True)

    max_page_size = Int(
        500, help="Largest `limit` a client may ask for when listing executions."
    ).tag(config=True)

    start_timeout = Float(
        10.0, help="Seconds a request waits for the dispatcher to start before a 503."
    ).tag(config=True)

    retry_start_seconds = Float(
        2.0, help="Seconds between attempts to start the dispatcher (say, the database is down)."
    ).tag(config=True)

    @property
    def api_root(self) -> str:
        """URL path of the API root, ``{prefix}api`` (no trailing slash)."""
        return self.prefix + "api"

    # -- set up ----------------------------------------------------------------------------------

    def initialize(self, argv: list[str] | None = None) -> None:
        """Read settings (files, then the command line); build the dispatcher and the web app."""
        from ..backends.registry import installed_backends, load_backend_class
        from ..config_files import load_config
        from ..dispatcher import Dispatcher

        self.classes = [CrucibleService, Dispatcher, HubAuth, HubOAuth]
        for name in installed_backends():
            with contextlib.suppress(Exception):
                self.classes.append(load_backend_class(name))
        self.parse_command_line(argv)
        command_line = copy.deepcopy(self.config)
        self.update_config(load_config(None))
        if self.config_file:
            self.load_config_file(self.config_file)
        self.update_config(command_line)

        self.dispatcher = Dispatcher(parent=self, log=self.log)
        if "single_dispatcher" not in self.config.get("CrucibleDispatcher", {}):
            self.dispatcher.single_dispatcher = True  # the one dispatcher of this database
        cache = {}
        if "cache_max_age" not in self.config.get("HubAuth", {}):
            cache["cache_max_age"] = self.auth_cache_seconds
        hub_auth = HubOAuth(parent=self, log=self.log, **cache)  # tokens, and browsers
        self.identity = HubIdentity(
            hub_auth,
            admin_scope=self.admin_scope,
            service_name=self.service_name,
            prefix=self.prefix,
            hub_timeout=self.hub_timeout,
        )
        if not os.environ.get("JUPYTERHUB_API_URL") and "api_url" not in self.config.get(
            "HubAuth", {}
        ):
            self.log.warning(
                "crucible: JUPYTERHUB_API_URL is not set; tokens are checked with the hub at %s"
                " (set c.HubAuth.api_url)",
                hub_auth.api_url,
            )
        self.web_app = web.Application(
            service_routes(self.prefix),
            crucible_service=self,
            cookie_secret=bytes.fromhex(self.cookie_secret),
            websocket_ping_interval=30,
            log_function=self._log_request,
        )
        self._started = asyncio.Event()
        self._start_error: str | None = None
        self._shutting_down = False
        self._stopped = False
        self._start_task: asyncio.Task | None = None
        self.http_server: HTTPServer | None = None

    def _log_request(self, handler: web.RequestHandler) -> None:
        status = handler.get_status()
        level = self.log.warning if status >= 500 else self.log.debug
        level(
            "%d %s %s %.1f ms",
            status,
            handler.request.method,
            handler.request.path,
            1000 * handler.request.request_time(),
        )

    # -- run -------------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Listen, start the dispatcher, run until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        url = urlparse(self.bind_url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        self.http_server = HTTPServer(self.web_app, xheaders=True)
        self.http_server.listen(port, host)
        self.log.info(
            "crucible %s service %r: API at http://%s:%d%sapi/ (probes %shealthz, %sreadyz)",
            __version__,
            self.service_name,
            host,
            port,
            self.prefix,
            self.prefix,
            self.prefix,
        )
        self._start_task = asyncio.ensure_future(self._start_dispatcher())
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()
        return 0

    async def _start_dispatcher(self) -> None:
        """Start the dispatcher, retrying while it cannot (the database is not up yet)."""
        while not self._shutting_down:
            try:
                await self.dispatcher.start()
            except Exception as e:  # noqa: BLE001 -- whatever stops it is reported, then retried
                self._start_error = str(e)
                self.log.error(
                    "crucible: the dispatcher could not start (%s); retrying in %g s",
                    e,
                    self.retry_start_seconds,
                )
                await asyncio.sleep(self.retry_start_seconds)
                continue
            self._start_error = None
            self._started.set()
            return

    async def ready(self) -> Any:
        """The started dispatcher; Unavailable (503) while it starts or after it stopped."""
        if self._stopped:
            raise Unavailable("crucible is shutting down; retry once it is back")
        try:
            await asyncio.wait_for(asyncio.shield(self._started.wait()), self.start_timeout)
        except asyncio.TimeoutError:
            why = f" ({self._start_error})" if self._start_error else ""
            raise Unavailable(
                f"the crucible dispatcher is still starting{why}; retry shortly"
            ) from None
        return self.dispatcher

    async def not_ready_reason(self) -> str | None:
        """Why the service should get no traffic now, or None when it is ready. Anyone may
        ask (the probe needs no token, and the hub's proxy serves it publicly), so the
        reason names no database, host or error text; those go to the service's log."""
        if self._shutting_down:
            return "shutting down"
        if not self._started.is_set():
            why = "; the service's log says why" if self._start_error else ""
            return f"the dispatcher has not started yet{why}"
        try:
            await asyncio.wait_for(self.dispatcher.list(limit=1), 5)
        except Exception as e:  # noqa: BLE001 -- the health answer says what failed, whatever it was
            self.log.warning(
                "crucible: not ready: the database does not answer: %s", e or type(e).__name__
            )
            return "the database does not answer; the service's log says why"
        return None

    async def shutdown(self) -> None:
        """Refuse new work, give running cells the grace period, end the rest, store all."""
        if self._shutting_down:
            return
        self._shutting_down = True
        grace = self.shutdown_grace_seconds
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._start_task
        if self._started.is_set():
            self.log.info(
                "crucible: shutting down; running cells get %g s to finish%s", grace,
                " (cells on Jobs are handed over)" if self.dispatcher.handover_on_stop else "",
            )  # fmt: skip
            left = await self.dispatcher.drain(grace)
            if left:
                self.log.warning("crucible: ending %d cell(s) still running at %g s", left, grace)
            await self.dispatcher.stop(
                reason=f"the crucible service shut down; the cell was still running after"
                f" the {grace:g} s grace period"
            )
        self._stopped = True
        if self.http_server is not None:
            self.http_server.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.http_server.close_all_connections(), 5)
        self.log.info("crucible: stopped")


async def run(argv: list[str] | None = None) -> int:
    """Set up and run the service in the running event loop (what ``crucible serve`` does)."""
    app = CrucibleService()
    app.initialize(argv)
    return await app.serve()


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``crucible serve [options]`` (``--help-all`` lists every setting)."""
    return asyncio.run(run(argv))
