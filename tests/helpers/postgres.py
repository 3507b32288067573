"""A throwaway PostgreSQL server from Debian's package, and admin SQL against it."""

from __future__ import annotations

import glob
from pathlib import Path


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that holds a server, if any."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


def admin(url: str, *statements: str) -> None:
    """Run SQL statements outside a transaction (CREATE/DROP DATABASE) against ``url``."""
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)
