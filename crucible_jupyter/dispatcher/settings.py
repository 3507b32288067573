"""The settings of the dispatcher (``c.CrucibleDispatcher.*``, documented traitlets).

:class:`DispatcherSettings` is the base of :class:`~.core.CrucibleDispatcher`: configuration
of the dispatcher is written for that class (traitlets reads a class's settings under the
names of its bases too), and every setting is read where it is used, so it may change.
"""

from __future__ import annotations

import os

from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .. import output_policy
from ..backends.registry import installed_backends
from ..models import Limits


class DispatcherSettings(LoggingConfigurable):
    """Every setting of the dispatcher, and the request bounds they make (:attr:`limits`)."""

    db_url = Unicode(
        None,
        allow_none=True,
        help="""Database URL (SQLAlchemy form). Default: SQLite in the Jupyter data dir
        (`jupyter --data-dir`/crucible/crucible.db). PostgreSQL:
        postgresql+psycopg://user:password@host/dbname. Env: CRUCIBLE_DB_URL.""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str | None:
        return os.environ.get("CRUCIBLE_DB_URL") or None

    backend = Unicode(
        help="Backend that runs executions unless a request names another. Env: CRUCIBLE_BACKEND.",
    ).tag(config=True)

    @default("backend")
    def _default_backend(self) -> str:
        return os.environ.get("CRUCIBLE_BACKEND", "local")

    enabled_backends = List(
        Unicode(),
        help="""Backends a request may choose with its `backend` field (default: every
        installed backend; one that is not reachable fails that request with its reason).""",
    ).tag(config=True)

    @default("enabled_backends")
    def _default_enabled_backends(self) -> list[str]:
        return installed_backends()

    max_concurrency = Integer(
        help="Most executions running at once on this dispatcher (default: number of CPUs).",
    ).tag(config=True)

    @default("max_concurrency")
    def _default_max_concurrency(self) -> int:
        return max(2, os.cpu_count() or 2)

    max_concurrency_per_user = Integer(
        0, help="Most executions one user may have running at once (0: no per-user limit)."
    ).tag(config=True)

    max_queued_per_user = Integer(
        0,
        min=0,
        help="""Most executions one user may have waiting in the queue at once (0: no
        limit). A submission past it is refused with 429 and a message saying how many are
        queued; the user waits for some to start, or cancels some. It holds for everything
        this dispatcher queues, so for every user of a `crucible serve` service (which is
        the only dispatcher of its database); dispatchers sharing a database each count
        their own.""",
    ).tag(config=True)

    aging_seconds = Float(
        30.0,
        help="""Seconds of waiting that raise a queued execution by one priority level, so
        low priority work cannot starve behind a stream of high priority work.""",
    ).tag(config=True)

    cancel_grace_seconds = Float(
        2.0, help="After a cancel interrupts a running cell, seconds before it is killed."
    ).tag(config=True)

    output_limit = Integer(
        10 << 20,
        help="Bytes of output kept per execution; the rest is dropped and counted (`truncated`).",
    ).tag(config=True)

    flush_interval = Float(
        0.05, help="Seconds between batched writes of output events to storage."
    ).tag(config=True)

    single_dispatcher = Bool(
        False,
        help="""This dispatcher is the only one using the database (the standalone service):
        at start it takes over every unfinished execution, whichever process left it.""",
    ).tag(config=True)

    handover_on_stop = Bool(
        False,
        help="""On stop (SIGTERM of `crucible serve`), leave cells running in backends that can
        reattach (Kubernetes) for the next dispatcher of the same database to follow, instead
        of waiting for them and then ending them: their Jobs go on, their records stay
        `running`, and the next start follows each to its real end with its whole output.
        For a service whose successor starts on the same database (the Helm chart's
        StatefulSet sets it). Local sandboxes end with their dispatcher either way.""",
    ).tag(config=True)

    max_code_bytes = Integer(1 << 20, help="Largest accepted cell source, in bytes.").tag(
        config=True
    )
    default_timeout = Float(60.0, help="Timeout in seconds when a request gives none.").tag(
        config=True
    )
    max_timeout = Float(3600.0, help="Largest timeout a request may ask for, in seconds.").tag(
        config=True
    )
    default_cpu = Float(1.0, help="CPU cores granted when a request gives none.").tag(config=True)
    max_cpu = Float(4.0, help="Most CPU cores a request may ask for.").tag(config=True)
    default_memory = Integer(
        512 << 20, help="Memory in bytes granted when a request gives none."
    ).tag(config=True)
    max_memory = Integer(8 << 30, help="Most memory in bytes a request may ask for.").tag(
        config=True
    )
    allowed_images = List(
        Unicode(), help="Images a request may name (Kubernetes backend); empty: any."
    ).tag(config=True)

    trusted_output_types = List(
        Unicode(),
        help="""MIME types of a cell's rich output passed to every surface (JupyterLab, the API,
        history) unchanged. By default only inert types pass (plain text, LaTeX, JSON, raster
        images), HTML, Markdown and SVG are sanitized and every other type is replaced by a
        notice (see crucible_jupyter/output_policy.py). RISK: a type listed here reaches the
        browser as the cell wrote it, and output of a live session is trusted there: listing
        text/html or application/javascript lets any cell run script in the user's
        JupyterLab, with their session (files, terminals, kernels); a type handled by a
        JavaScript renderer (application/vnd.jupyter.widget-view+json, Plotly's, Vega's) is
        only as safe as that renderer. Env: CRUCIBLE_TRUSTED_OUTPUT_TYPES (comma separated);
        the Jupyter server hands the value to its kernels the same way.""",
    ).tag(config=True)

    @default("trusted_output_types")
    def _default_trusted_output_types(self) -> list[str]:
        return sorted(output_policy.trusted_types_from_env())

    @property
    def limits(self) -> Limits:
        """The bounds requests are validated against, from this dispatcher's settings."""
        return Limits(
            max_code_bytes=self.max_code_bytes,
            default_timeout=self.default_timeout,
            max_timeout=self.max_timeout,
            default_cpu=self.default_cpu,
            max_cpu=self.max_cpu,
            default_memory=self.default_memory,
            max_memory=self.max_memory,
            images=tuple(self.allowed_images),
            backends=tuple(dict.fromkeys([self.backend, *self.enabled_backends])),
        )
