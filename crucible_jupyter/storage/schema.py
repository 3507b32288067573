"""SQLAlchemy 2 typed table mappings for the execution history.

These classes are the single description of the schema: the Alembic migrations in
``storage/migrations`` must produce exactly these tables (a test compares them), and
:class:`~crucible_jupyter.storage.Storage` reads and writes through them.

Times are integer milliseconds since the epoch (BIGINT), so both SQLite and PostgreSQL
store and compare them the same way.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Alembic's version table; named for this project so a database shared with another
#: Alembic user (JupyterHub uses ``alembic_version``) does not collide.
VERSION_TABLE = "crucible_alembic_version"

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of the storage tables; its ``metadata`` is the migration target."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ExecutionRow(Base):
    """One row per execution: the request inlined as columns, plus its outcome."""

    __tablename__ = "executions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    #: The backend that actually ran the execution (``Execution.backend``).
    backend: Mapped[str] = mapped_column(Text)
    isolation: Mapped[str | None] = mapped_column(Text)
    output_bytes: Mapped[int] = mapped_column(BigInteger)
    truncated: Mapped[bool] = mapped_column(Boolean)
    dropped_bytes: Mapped[int] = mapped_column(BigInteger)
    dispatcher_id: Mapped[str | None] = mapped_column(Text)
    cancel_requested_at: Mapped[int | None] = mapped_column(BigInteger)
    # -- the request --------------------------------------------------------------------
    code: Mapped[str] = mapped_column(Text)
    language: Mapped[str] = mapped_column(Text)
    timeout: Mapped[float] = mapped_column(Float)
    priority: Mapped[str] = mapped_column(String(8))
    cpu: Mapped[float] = mapped_column(Float)
    memory: Mapped[int] = mapped_column(BigInteger)
    env: Mapped[dict[str, Any]] = mapped_column(JSON)
    name: Mapped[str | None] = mapped_column(Text)
    #: The backend the request asked for (``ExecutionRequest.backend``), None for default.
    requested_backend: Mapped[str | None] = mapped_column(Text)
    image: Mapped[str | None] = mapped_column(Text)
    notebook_path: Mapped[str | None] = mapped_column(Text)
    cell_id: Mapped[str | None] = mapped_column(Text)
    kernel_id: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # "page of 50 newest", optionally by user or by status, is an index range scan.
        Index("ix_executions_created_at_id", "created_at", "id"),
        Index("ix_executions_user_created_at_id", "user", "created_at", "id"),
        Index("ix_executions_status_created_at_id", "status", "created_at", "id"),
    )


class ExecutionTagRow(Base):
    """One row per (execution, tag); ``position`` keeps the request's tag order."""

    __tablename__ = "execution_tags"

    execution_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(Text, primary_key=True)
    position: Mapped[int] = mapped_column(SmallInteger)

    __table_args__ = (Index("ix_execution_tags_tag_execution_id", "tag", "execution_id"),)


class EventRow(Base):
    """One numbered event of an execution; ``payload`` is the event's data as JSON text."""

    __tablename__ = "events"

    execution_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    t: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
