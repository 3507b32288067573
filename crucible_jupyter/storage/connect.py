"""Connecting to the database: the default SQLite location, URL normalization, and the
SQLite connection settings (WAL, busy timeout, foreign keys, BEGIN IMMEDIATE for writers)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ..errors import StorageError


def default_url() -> str:
    """The default database: a SQLite file at ``<jupyter data dir>/crucible/crucible.db``.

    The folder is created if missing; the file itself is created on first connection.
    """
    from jupyter_core.paths import jupyter_data_dir

    folder = Path(jupyter_data_dir()) / "crucible"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'crucible.db'}"


def normalize_url(url: str | URL) -> URL:
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise StorageError(
            "database url is not valid; use sqlite:///path/to/file.db or"
            " postgresql://user:password@host/dbname"
        ) from e
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def sqlite_on_connect(dbapi_connection, _record) -> None:
    # Let the "begin" listener emit BEGIN itself so reads get a real snapshot and
    # writers take the lock up front (BEGIN IMMEDIATE) instead of failing to upgrade.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA busy_timeout = 5000")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


def sqlite_on_begin(conn) -> None:
    mode = "IMMEDIATE" if conn.get_execution_options().get("crucible_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")
