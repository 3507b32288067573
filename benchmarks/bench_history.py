"""History page latency from a large execution table, next to a bare ``SELECT 1``.

Fills a SQLite database (and PostgreSQL with ``--postgres-url``) with ``--rows``
executions (default 1,000,000; bulk inserts through the driver: executemany / COPY)
spread over 20 users and all statuses, then times ``--calls`` calls (default 200) of
``Storage.list(limit=50)`` for: the first page, a deep page (resumed from a cursor half
way down the table), the first page of one user, and the first page of one status.
The reference is a ``SELECT 1`` round trip through the same Storage engine and session
machinery, measured in the same run. Budget (ARCHITECTURE.md): history page ≤ 20 ms p50.

    python benchmarks/bench_history.py                      # SQLite, 1M rows
    python benchmarks/bench_history.py --rows 100000 --postgres-url postgresql://u@host/db

The SQLite file is kept (default /tmp/crucible-bench/history.db) and reused when it already
holds the requested number of rows; pass ``--fresh`` to rebuild it. PostgreSQL tables are
always rebuilt (the database must be disposable: its crucible tables are dropped).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crucible_jupyter.models import Status, now_ms
from crucible_jupyter.storage import ExecutionRow, Storage, encode_cursor

COLUMNS = [c.name for c in ExecutionRow.__table__.c]
STATUSES = [s.value for s in Status]
WEIGHTS = [1, 0.2, 1, 70, 15, 3, 9.8]  # queued, starting, running, succeeded, failed, ...
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}
USERS = [f"user{i:02d}" for i in range(20)]
CODE = "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n"
BATCH = 20_000


def generate(n: int, seed: int = 7) -> Iterator[tuple[tuple, str | None]]:
    """``n`` execution rows (column order of ExecutionRow) oldest first, with an optional tag."""
    rnd = random.Random(seed)
    t = now_ms() - n * 40
    for _ in range(n):
        t += rnd.choice((0, 3, 17, 40, 60, 80))  # some executions share a millisecond
        status = rnd.choices(STATUSES, WEIGHTS)[0]
        started = None if status in ("queued", "starting") else t + rnd.randrange(5, 300)
        finished = None
        if status in TERMINAL and started is not None:
            finished = started + int(rnd.expovariate(1 / 900))
        r = rnd.getrandbits(80)
        h = f"{t:012x}{0x7000 | (r & 0xFFF):04x}{0x8000 | ((r >> 12) & 0x3FFF):04x}{r >> 26:014x}"
        eid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        values = {
            "id": eid, "user": rnd.choice(USERS), "status": status, "created_at": t,
            "started_at": started, "finished_at": finished,
            "exit_code": None if finished is None else (0 if status == "succeeded" else 1),
            "reason": "memory limit exceeded" if status == "failed" else None,
            "backend": "local", "isolation": "bubblewrap", "output_bytes": rnd.randrange(10_000),
            "truncated": False, "dropped_bytes": 0, "dispatcher_id": "bench:1",
            "cancel_requested_at": None, "code": CODE, "language": "python", "timeout": 60.0,
            "priority": "normal", "cpu": 1.0, "memory": 512 << 20, "env": "{}", "name": None,
            "requested_backend": None, "image": None, "notebook_path": "analysis.ipynb",
            "cell_id": f"cell-{rnd.randrange(50)}", "kernel_id": None,
        }  # fmt: skip
        yield tuple(values[c] for c in COLUMNS), ("nightly" if rnd.random() < 0.1 else None)


def fill(storage: Storage, n: int) -> float:
    """Bulk-insert ``n`` rows through the raw driver connection; returns seconds taken."""
    t0 = time.perf_counter()
    raw = storage._engine.raw_connection()
    try:
        cur = raw.cursor()
        cols = ", ".join(f'"{c}"' for c in COLUMNS)
        if storage.dialect == "sqlite":
            sql = f"INSERT INTO executions ({cols}) VALUES ({', '.join('?' * len(COLUMNS))})"
            rows, tags = [], []
            cur.execute("BEGIN IMMEDIATE")
            for row, tag in generate(n):
                rows.append(row)
                if tag:
                    tags.append((row[0], tag, 0))
                if len(rows) >= BATCH:
                    cur.executemany(sql, rows)
                    rows.clear()
            cur.executemany(sql, rows)
            cur.executemany(
                "INSERT INTO execution_tags (execution_id, tag, position) VALUES (?, ?, ?)", tags
            )
            cur.execute("COMMIT")
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # reads then come from the db file
        else:
            tags = []
            with cur.copy(f"COPY executions ({cols}) FROM STDIN") as copy:
                for row, tag in generate(n):
                    copy.write_row(row)
                    if tag:
                        tags.append((row[0], tag, 0))
            with cur.copy("COPY execution_tags (execution_id, tag, position) FROM STDIN") as copy:
                for row in tags:
                    copy.write_row(row)
            raw.commit()
            cur.execute("ANALYZE")  # what autovacuum does shortly after a bulk load
        cur.close()
    finally:
        raw.close()
    return time.perf_counter() - t0


def count(storage: Storage) -> int:
    """Number of stored executions."""
    with storage._sessions() as s:
        return s.execute(text("SELECT count(*) FROM executions")).scalar_one()


def timed(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """p50 and p95 in milliseconds over ``calls`` calls (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    samples.sort()
    return statistics.median(samples), samples[max(0, round(0.95 * len(samples)) - 1)]


def measure(storage: Storage, calls: int) -> list[tuple[str, float, float]]:
    """The scenarios of the table: (name, p50 ms, p95 ms)."""
    n = count(storage)
    with storage._sessions() as s:
        mid = s.execute(
            text("SELECT created_at, id FROM executions ORDER BY created_at DESC, id DESC"
                 " LIMIT 1 OFFSET :k"),
            {"k": n // 2},
        ).one()  # fmt: skip
    deep = encode_cursor(mid.created_at, mid.id)

    def select1() -> None:
        with storage._sessions() as s:
            s.execute(text("SELECT 1")).scalar_one()

    def check(page_cursor: tuple[list, str | None]) -> None:
        assert len(page_cursor[0]) == 50, "benchmark table too small for a page of 50"

    out = [("SELECT 1 (reference)", *timed(select1, calls))]
    out.append(("list: first page", *timed(lambda: check(storage.list(limit=50)), calls)))
    out.append(
        (f"list: deep page (row {n // 2:,})",
         *timed(lambda: check(storage.list(cursor=deep, limit=50)), calls))
    )  # fmt: skip
    out.append(
        ("list: user=user07", *timed(lambda: check(storage.list(user="user07", limit=50)), calls))
    )
    out.append(
        ("list: status=failed",
         *timed(lambda: check(storage.list(status="failed", limit=50)), calls))
    )  # fmt: skip
    out.append(
        ("list: status in (failed, t/o)",
         *timed(lambda: check(storage.list(status=["failed", "timed_out"], limit=50)), calls))
    )  # fmt: skip
    return out


def run(label: str, storage: Storage, rows: int, fresh: bool, calls: int) -> None:
    """Migrate, (re)fill unless already holding ``rows`` rows, measure and print one table."""
    storage.migrate()
    have = count(storage)
    if fresh or have != rows:
        with storage._sessions() as s, s.begin():
            for table in ("events", "execution_tags", "executions"):
                s.execute(text(f"DELETE FROM {table}"))
        print(f"[{label}] inserting {rows:,} executions...", file=sys.stderr, flush=True)
        secs = fill(storage, rows)
        print(f"[{label}] inserted in {secs:.1f} s", file=sys.stderr, flush=True)
    else:
        print(f"[{label}] reusing {have:,} executions", file=sys.stderr, flush=True)
    results = measure(storage, calls)
    print(f"\n{label}: {count(storage):,} executions, {calls} calls each, limit=50")
    print(f"{'query':<32} {'p50 ms':>8} {'p95 ms':>8}")
    for name, p50, p95 in results:
        print(f"{name:<32} {p50:>8.3f} {p95:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one table per database."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="executions to store")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per query")
    ap.add_argument("--sqlite", default="/tmp/crucible-bench/history.db", help="SQLite file")
    ap.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    ap.add_argument("--postgres-url", help="disposable PostgreSQL database to benchmark too")
    ap.add_argument("--fresh", action="store_true", help="rebuild the SQLite table")
    args = ap.parse_args(argv)
    if args.rows < 100:
        ap.error("--rows must be at least 100")
    targets = []
    if not args.no_sqlite:
        targets.append(("SQLite", f"sqlite:///{args.sqlite}", args.fresh))
    if args.postgres_url:
        targets.append(("PostgreSQL", args.postgres_url, True))
    for label, url, fresh in targets:
        with Storage(url) as storage:
            run(label, storage, args.rows, fresh, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
