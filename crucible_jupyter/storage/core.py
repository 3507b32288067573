"""The synchronous :class:`Storage` facade over SQLite or PostgreSQL."""

from __future__ import annotations

import builtins
import heapq
import json
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

from sqlalchemy import and_, create_engine, event, exists, func, insert, or_, select, text, update
from sqlalchemy.engine import URL, CursorResult, Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import Conflict, CrucibleError, InvalidRequest, StorageError
from ..models import (
    TERMINAL,
    Event,
    Execution,
    Priority,
    Status,
    now_ms,
)
from .connect import default_url, normalize_url, sqlite_on_begin, sqlite_on_connect
from .schema import EventRow, ExecutionRow, ExecutionTagRow
from .values import (
    EX_NAMES,
    MAX_ID_LEN,
    check_ms,
    clean_json,
    clean_text,
    decode_cursor,
    dump_payload,
    encode_cursor,
    execution_from_row,
    not_found,
    opt_text,
    parse_statuses,
    valid_id,
)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

_EX = ExecutionRow.__table__
_TAGS = ExecutionTagRow.__table__
_EVENTS = EventRow.__table__
_EX_COLUMNS = tuple(_EX.c)
assert EX_NAMES[0] == "id"  # rows are read positionally: r[0] is the id
_SELECT_EX = select(*_EX_COLUMNS)  # built once; .where() etc. copy it
_ORDER_KEY = itemgetter(EX_NAMES.index("created_at"), 0)  # (created_at, id) of a row

#: Fields :meth:`Storage.update` accepts.
UPDATABLE_FIELDS = frozenset(
    {
        "status",
        "started_at",
        "finished_at",
        "exit_code",
        "reason",
        "isolation",
        "output_bytes",
        "truncated",
        "dropped_bytes",
        "dispatcher_id",
        "backend",
    }
)
_TEXT_FIELDS = frozenset({"reason", "isolation", "dispatcher_id", "backend"})
_UNFINISHED = (Status.QUEUED.value, Status.STARTING.value, Status.RUNNING.value)
_MAX_PAGE = 1000
_CHUNK = 500
_PG_MIGRATION_LOCK = 0x6372_7563_6962  # "crucib": serializes concurrent migrate() calls


class Storage:
    """The execution history in SQLite (default) or PostgreSQL.

    Every method is synchronous, thread-safe (one session per call from a shared
    engine) and runs in one transaction. Database failures are raised as
    :class:`~crucible_jupyter.errors.StorageError` naming what failed, with the
    database password masked. ``url`` is the database URL with its password masked;
    ``dialect`` is ``"sqlite"`` or ``"postgresql"``.
    """

    def __init__(self, url: str | URL | None = None, *, echo: bool = False) -> None:
        """Open (lazily) the database at ``url``; None means :func:`default_url`.

        ``postgresql://`` URLs are served by psycopg 3. SQLite files get WAL mode,
        a 5 s busy timeout, foreign keys and ``synchronous=NORMAL`` on every connection.
        Call :meth:`migrate` once before use to create or upgrade the tables.
        """
        u = normalize_url(default_url() if url is None else url)
        self.dialect = u.get_backend_name()
        self.url = u.render_as_string(hide_password=True)
        self._password = u.password
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
                Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self._engine: Engine = create_engine(u, **kwargs)
        except (ArgumentError, NoSuchModuleError, ImportError) as e:
            raise StorageError(
                f"cannot use database {self.url}: {e}; supported are sqlite:///path and"
                " postgresql://... (pip install 'crucible_jupyter[postgres]')"
            ) from None
        if self.dialect == "sqlite":
            event.listen(self._engine, "connect", sqlite_on_connect)
            event.listen(self._engine, "begin", sqlite_on_begin)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._migrate_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    __str__ = __repr__

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> StorageError:
        orig = getattr(exc, "orig", None) or exc
        detail = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        if self._password:
            detail = detail.replace(self._password, "***")
        if "database is locked" in detail:
            detail += " (another process held the write lock for more than 5 s)"
        return StorageError(
            f"database error while {action} ({self.url}): {type(orig).__name__}: {detail}"
        )

    @contextmanager
    def _session(
        self, action: str, *, write: bool = False, snapshot: bool = False
    ) -> Iterator[Session]:
        options: dict[str, Any] = {}
        if write:
            options["crucible_write"] = True
        if snapshot and self.dialect == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        try:
            with self._sessions() as session, session.begin():
                session.connection(execution_options=options)
                yield session
        except CrucibleError:
            raise
        except SQLAlchemyError as e:
            raise self._error(action, e) from e

    # -- schema -----------------------------------------------------------------------

    def migrate(self) -> None:
        """Create or upgrade the tables to the newest schema (Alembic ``upgrade head``).

        Safe on an empty database, a no-op on an up-to-date one, and safe when several
        processes migrate at once: the whole upgrade runs in one transaction that holds
        the SQLite write lock (``BEGIN IMMEDIATE``) or a PostgreSQL advisory lock.
        """
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self._migrate_lock:
            try:
                with self._engine.connect() as conn:
                    conn.execution_options(crucible_write=True)
                    driver: Any = conn.connection.driver_connection  # set while conn is open
                    if self.dialect == "sqlite":  # wait longer for another migrator
                        driver.execute("PRAGMA busy_timeout = 60000")
                    with conn.begin():
                        if self.dialect == "postgresql":
                            conn.execute(
                                text("SELECT pg_advisory_xact_lock(:k)"),
                                {"k": _PG_MIGRATION_LOCK},
                            )
                        cfg.attributes["connection"] = conn
                        command.upgrade(cfg, "head")
                    if self.dialect == "sqlite":
                        driver.execute("PRAGMA busy_timeout = 5000")
            except SQLAlchemyError as e:
                raise self._error("migrating the database schema", e) from e

    # -- writes -----------------------------------------------------------------------

    def create(self, execution: Execution) -> None:
        """Insert ``execution`` (request, tags and state) as one new row.

        This is how an accepted request is persisted as ``queued`` before it runs.
        Raises Conflict if the id already exists, InvalidRequest for an unusable id.
        """
        if not valid_id(execution.id):
            raise InvalidRequest(
                f"execution id {execution.id!r} must be text of 1-{MAX_ID_LEN} characters",
                field="id",
            )
        req = execution.request
        nb = req.notebook
        row = {
            "id": execution.id,
            "user": clean_text(execution.user),
            "status": Status(execution.status).value,
            "created_at": execution.created_at,
            "started_at": execution.started_at,
            "finished_at": execution.finished_at,
            "exit_code": execution.exit_code,
            "reason": opt_text(execution.reason),
            "backend": clean_text(execution.backend),
            "isolation": opt_text(execution.isolation),
            "output_bytes": execution.output_bytes,
            "truncated": bool(execution.truncated),
            "dropped_bytes": execution.dropped_bytes,
            "dispatcher_id": opt_text(execution.dispatcher_id),
            "cancel_requested_at": None,
            "code": clean_text(req.code),
            "language": clean_text(req.language),
            "timeout": float(req.timeout),
            "priority": Priority(req.priority).value,
            "cpu": float(req.resources.cpu),
            "memory": int(req.resources.memory),
            "env": clean_json(dict(req.env)),
            "name": opt_text(req.name),
            "requested_backend": opt_text(req.backend),
            "image": opt_text(req.image),
            "notebook_path": opt_text(nb.path),
            "cell_id": opt_text(nb.cell_id),
            "kernel_id": opt_text(nb.kernel_id),
        }
        tags = [
            {"execution_id": execution.id, "tag": clean_text(tag), "position": i}
            for i, tag in enumerate(dict.fromkeys(req.tags))
        ]
        try:
            with self._session(f"storing execution {execution.id}", write=True) as s:
                s.execute(insert(ExecutionRow), [row])
                if tags:
                    s.execute(insert(ExecutionTagRow), tags)
        except StorageError as e:
            if isinstance(e.__cause__, IntegrityError) and self._exists(execution.id):
                raise Conflict(f"execution {execution.id} is already stored", field="id") from None
            raise

    def update(self, execution_id: str, **fields: Any) -> None:
        """Set some of an execution's state fields (see ``UPDATABLE_FIELDS``).

        ``status`` may be a Status or its value. Raises NotFound if there is no such
        execution, TypeError for a field that cannot be updated.
        """
        unknown = sorted(set(fields) - UPDATABLE_FIELDS)
        if unknown:
            raise TypeError(
                f"cannot update {', '.join(unknown)};"
                f" updatable: {', '.join(sorted(UPDATABLE_FIELDS))}"
            )
        if not valid_id(execution_id):
            raise not_found(execution_id)
        values = dict(fields)
        if "status" in values:
            values["status"] = parse_statuses(values["status"])[0]
        if "truncated" in values:
            values["truncated"] = bool(values["truncated"])
        for key in _TEXT_FIELDS & values.keys():
            values[key] = opt_text(values[key])
        if not values:
            if not self._exists(execution_id):
                raise not_found(execution_id)
            return
        with self._session(f"updating execution {execution_id}", write=True) as s:
            result = cast(
                "CursorResult[Any]",  # what an UPDATE returns (typed as a plain Result)
                s.execute(update(ExecutionRow).where(_EX.c.id == execution_id).values(values)),
            )
            if result.rowcount == 0:
                raise not_found(execution_id)

    def append_events(self, execution_id: str, events: list[Event]) -> None:
        """Store ``events`` of one execution in one transaction (a batch insert).

        Events keep their ``seq`` (primary key with the execution id, so storing a seq
        twice is a StorageError). Status events (``type="status"``) are how each state
        transition is recorded with its millisecond time. Text that is not valid UTF-8
        (lone surrogates) is stored escaped instead of failing. NotFound if the
        execution does not exist.
        """
        if not valid_id(execution_id):
            raise not_found(execution_id)
        if not events:
            return
        rows = [
            {
                "execution_id": execution_id,
                "seq": ev.seq,
                "t": ev.t,
                "type": clean_text(ev.type),
                "payload": dump_payload(ev.data),
            }
            for ev in events
        ]
        try:
            with self._session(
                f"storing {len(rows)} event(s) of execution {execution_id}", write=True
            ) as s:
                s.execute(insert(EventRow), rows)
        except StorageError as e:
            if isinstance(e.__cause__, IntegrityError) and not self._exists(execution_id):
                raise not_found(execution_id) from None
            raise

    def request_cancel(self, execution_id: str) -> None:
        """Record that someone asked to cancel the execution (the first request's time wins).

        Any process may call this (e.g. ``crucible cancel``); the dispatcher running the
        execution sees it through :meth:`cancel_requested`. NotFound if missing.
        """
        if not valid_id(execution_id):
            raise not_found(execution_id)
        with self._session(f"requesting cancellation of {execution_id}", write=True) as s:
            result = cast(
                "CursorResult[Any]",  # what an UPDATE returns (typed as a plain Result)
                s.execute(
                    update(ExecutionRow)
                    .where(_EX.c.id == execution_id)
                    .values(cancel_requested_at=func.coalesce(_EX.c.cancel_requested_at, now_ms()))
                ),
            )
            if result.rowcount == 0:
                raise not_found(execution_id)

    # -- reads ------------------------------------------------------------------------

    def _exists(self, execution_id: str) -> bool:
        with self._session(f"looking up execution {execution_id}") as s:
            return s.execute(select(_EX.c.id).where(_EX.c.id == execution_id)).first() is not None

    def get(self, execution_id: str) -> Execution:
        """The execution with this id; NotFound (saying how to list ids) otherwise."""
        if not valid_id(execution_id):
            raise not_found(execution_id)
        with self._session(f"reading execution {execution_id}") as s:
            row = s.execute(_SELECT_EX.where(_EX.c.id == execution_id)).first()
            if row is None:
                raise not_found(execution_id)
            return self._build(s, [row])[0]

    def events(self, execution_id: str, after: int = -1, limit: int | None = None) -> list[Event]:
        """Events of the execution with ``seq > after``, in seq order, at most ``limit``.

        An unknown execution simply has no events (an empty list).
        """
        check_ms(after=after)
        if not valid_id(execution_id):
            return []
        q = (
            select(_EVENTS.c.seq, _EVENTS.c.t, _EVENTS.c.type, _EVENTS.c.payload)
            .where(_EVENTS.c.execution_id == execution_id, _EVENTS.c.seq > after)
            .order_by(_EVENTS.c.seq)
        )
        if limit is not None:
            if limit < 0:
                raise InvalidRequest("limit must be zero or more", field="limit")
            q = q.limit(limit)
        with self._session(f"reading events of execution {execution_id}") as s:
            rows = s.execute(q).all()
        return [
            Event(seq=seq, t=t, type=type_, data=json.loads(payload))
            for seq, t, type_, payload in rows
        ]

    def list(
        self,
        *,
        user: str | None = None,
        status: Status | str | Iterable[Status | str] | None = None,
        tag: str | None = None,
        since: int | None = None,
        until: int | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[Execution], str | None]:
        """One page of executions, newest first by ``(created_at, id)``.

        Filters combine with AND: ``user``; ``status`` (one or a list); ``tag``;
        ``since`` (created_at >= since, ms) and ``until`` (created_at < until, ms).
        ``cursor`` is the opaque string a previous call returned; pages never repeat or
        skip rows, even while new executions arrive. Returns ``(page, next_cursor)``,
        next_cursor None on the last page. A bad cursor or limit raises InvalidRequest.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {_MAX_PAGE}", field="limit")
        check_ms(since=since, until=until)
        q = _SELECT_EX
        if user is not None:
            q = q.where(_EX.c.user == clean_text(str(user)))
        statuses = [None] if status is None else list(dict.fromkeys(parse_statuses(status)))
        if tag is not None:
            tag = clean_text(str(tag))
            q = q.where(exists().where(_TAGS.c.tag == tag, _TAGS.c.execution_id == _EX.c.id))
        if since is not None:
            q = q.where(_EX.c.created_at >= since)
        if until is not None:
            q = q.where(_EX.c.created_at < until)
        if cursor is not None:
            c_at, c_id = decode_cursor(cursor)
            q = q.where(
                _EX.c.created_at <= c_at,
                or_(_EX.c.created_at < c_at, and_(_EX.c.created_at == c_at, _EX.c.id < c_id)),
            )
        q = q.order_by(_EX.c.created_at.desc(), _EX.c.id.desc()).limit(limit + 1)
        with self._session("listing executions") as s:
            if len(statuses) == 1:
                if statuses[0] is not None:
                    q = q.where(_EX.c.status == statuses[0])
                rows = s.execute(q).all()
            else:
                # One index range scan per status (status, created_at, id), merged here:
                # "status IN (...)" would make the database sort every matching row.
                parts = [s.execute(q.where(_EX.c.status == v)).all() for v in statuses]
                rows = list(islice(heapq.merge(*parts, key=_ORDER_KEY, reverse=True), limit + 1))
            more = len(rows) > limit
            rows = rows[:limit]
            page = self._build(s, rows)
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more else None
        return page, next_cursor

    def stats(self, *, user: str | None = None, since: int | None = None) -> dict[str, Any]:
        """Counts by status and duration percentiles, computed in the database.

        ``{"total": n, "by_status": {every status: n}, "duration_ms": {"p50", "p95",
        "count"}}``; durations (nearest-rank percentiles, None when there are none) are
        over terminal executions with both started_at and finished_at. ``user`` and
        ``since`` (created_at >= since, ms) filter everything. One consistent snapshot.
        """
        check_ms(since=since)
        where = []
        if user is not None:
            where.append(_EX.c.user == clean_text(str(user)))
        if since is not None:
            where.append(_EX.c.created_at >= since)
        finished = [
            *where,
            _EX.c.status.in_([s.value for s in TERMINAL]),
            _EX.c.started_at.is_not(None),
            _EX.c.finished_at.is_not(None),
        ]
        duration = (_EX.c.finished_at - _EX.c.started_at).label("duration")
        by_status = {s.value: 0 for s in Status}
        percentiles: dict[str, int | None] = {"p50": None, "p95": None}
        with self._session("computing statistics", snapshot=True) as s:
            for st, n in s.execute(
                select(_EX.c.status, func.count()).where(*where).group_by(_EX.c.status)
            ):
                by_status[st] = by_status.get(st, 0) + n
            count = s.execute(select(func.count()).select_from(_EX).where(*finished)).scalar_one()
            for name, p in (("p50", 50), ("p95", 95)):
                if count:
                    k = max(0, math.ceil(p * count / 100) - 1)
                    value = s.execute(
                        select(duration).where(*finished).order_by(duration).limit(1).offset(k)
                    ).scalar()
                    percentiles[name] = None if value is None else int(value)
        return {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "duration_ms": {**percentiles, "count": count},
        }

    def unfinished(self) -> builtins.list[Execution]:  # `list` here is Storage.list
        """Executions still queued, starting or running, oldest first.

        After a crash the dispatcher reconciles these with what the backend reports.
        """
        q = _SELECT_EX.where(_EX.c.status.in_(_UNFINISHED)).order_by(_EX.c.created_at, _EX.c.id)
        with self._session("listing unfinished executions") as s:
            return self._build(s, s.execute(q).all())

    def cancel_requested(self, execution_ids: Sequence[str]) -> set[str]:
        """The subset of ``execution_ids`` someone asked to cancel (unknown ids are ignored)."""
        ids = sorted({i for i in execution_ids if valid_id(i)})
        found: set[str] = set()
        if not ids:
            return found
        with self._session("reading cancellation requests") as s:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                found.update(
                    s.execute(
                        select(_EX.c.id).where(
                            _EX.c.id.in_(chunk), _EX.c.cancel_requested_at.is_not(None)
                        )
                    ).scalars()
                )
        return found

    def close(self) -> None:
        """Close every pooled connection (dispose the engine). The object may be reused."""
        self._engine.dispose()

    # -- rows → models ----------------------------------------------------------------

    def _build(self, session: Session, rows: Sequence[Any]) -> builtins.list[Execution]:
        if not rows:
            return []
        tags: dict[str, list[str]] = {}
        ids = [r[0] for r in rows]
        for start in range(0, len(ids), _CHUNK):
            for eid, tag in session.execute(
                select(_TAGS.c.execution_id, _TAGS.c.tag)
                .where(_TAGS.c.execution_id.in_(ids[start : start + _CHUNK]))
                .order_by(_TAGS.c.execution_id, _TAGS.c.position)
            ):
                tags.setdefault(eid, []).append(tag)
        return [execution_from_row(r, tuple(tags.get(r[0], ()))) for r in rows]
