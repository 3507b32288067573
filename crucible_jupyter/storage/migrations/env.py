"""Alembic environment for crucible_jupyter's storage.

Normally run through :meth:`crucible_jupyter.storage.Storage.migrate`, which passes an
open connection (already inside a locked transaction) in ``config.attributes["connection"]``.
The ``alembic`` command line works too when ``sqlalchemy.url`` is set in its config.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from crucible_jupyter.storage.schema import VERSION_TABLE, Base

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("crucible_jupyter migrations run online only (Storage.migrate())")

_connection = config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
else:
    _url = config.get_main_option("sqlalchemy.url")
    if not _url:
        raise SystemExit("set sqlalchemy.url, or migrate with crucible_jupyter Storage.migrate()")
    _engine = create_engine(_url)
    try:
        with _engine.connect() as _conn:
            _run(_conn)
            _conn.commit()
    finally:
        _engine.dispose()
