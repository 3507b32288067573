"""Persistent execution history: SQLAlchemy 2 mappings, Alembic migrations, ``Storage``.

SQLite (a file in the Jupyter data dir) by default, PostgreSQL in production::

    storage = Storage()              # or Storage("postgresql://user:pw@host/db")
    storage.migrate()
    storage.create(execution)
"""

from __future__ import annotations

from .connect import default_url
from .core import UPDATABLE_FIELDS, Storage
from .schema import VERSION_TABLE, Base, EventRow, ExecutionRow, ExecutionTagRow
from .values import clean_text, decode_cursor, encode_cursor

__all__ = [
    "UPDATABLE_FIELDS",
    "VERSION_TABLE",
    "Base",
    "EventRow",
    "ExecutionRow",
    "ExecutionTagRow",
    "Storage",
    "clean_text",
    "decode_cursor",
    "default_url",
    "encode_cursor",
]
