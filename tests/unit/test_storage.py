"""Storage against both real databases (SQLite file and the PostgreSQL of the test run)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from crucible_jupyter.errors import Conflict, InvalidRequest, NotFound, StorageError
from crucible_jupyter.models import (
    Event,
    Execution,
    ExecutionRequest,
    NotebookRef,
    Priority,
    Resources,
    Status,
    new_execution_id,
)
from crucible_jupyter.storage import VERSION_TABLE, Base, Storage, default_url, encode_cursor

REPO = Path(__file__).resolve().parents[2]
BASE_T = 1_795_000_000_000


def make(
    n: int = 0, *, user: str = "alice", status: Status = Status.QUEUED, tags=(), **kw
) -> Execution:
    """An execution created ``n`` ms after BASE_T."""
    request = ExecutionRequest(code=f"print({n})", tags=tuple(tags))
    return Execution(
        id=new_execution_id(), request=request, user=user, status=status,
        created_at=BASE_T + n, **kw,
    )  # fmt: skip


def test_round_trip_every_field(storage: Storage) -> None:
    request = ExecutionRequest(
        code="# émoji 🚀 עברית مرحبا 中文\nprint('שלום 🎉')\n",
        language="python",
        timeout=12.5,
        priority=Priority.HIGH,
        resources=Resources(cpu=0.25, memory=256 << 20),
        tags=("zeta", "alpha", "team:ml", "ü-tag"),
        env={"GREETING": "héllo 👋", "EMPTY": ""},
        notebook=NotebookRef(path="dir/ノート 📓.ipynb", cell_id="c-1", kernel_id="k-2"),
        name="my cell ✨",
        backend="kubernetes",
        image="python:3.12-slim",
    )
    ex = Execution(
        id=new_execution_id(),
        request=request,
        user="bob@example.org",
        status=Status.FAILED,
        created_at=BASE_T,
        started_at=BASE_T + 10,
        finished_at=BASE_T + 1234,
        exit_code=137,
        reason="memory limit exceeded — 256 MiB",
        backend="kubernetes",
        isolation="gvisor",
        output_bytes=10**10,
        truncated=True,
        dropped_bytes=5 * 10**9,
        dispatcher_id="host:42",
    )
    storage.create(ex)
    got = storage.get(ex.id)
    assert got == ex
    assert got.request.tags == ("zeta", "alpha", "team:ml", "ü-tag")
    assert isinstance(got.request.priority, Priority)
    assert isinstance(got.status, Status)
    with pytest.raises(Conflict, match="already stored"):
        storage.create(ex)


def test_defaults_round_trip(storage: Storage) -> None:
    ex = Execution(id=new_execution_id(), request=ExecutionRequest.from_dict({"code": "1"}))
    storage.create(ex)
    assert storage.get(ex.id) == ex


def test_update(storage: Storage) -> None:
    ex = make()
    storage.create(ex)
    storage.update(ex.id, status=Status.STARTING, dispatcher_id="d1", backend="local")
    storage.update(ex.id, status="running", started_at=BASE_T + 5, isolation="bubblewrap")
    storage.update(
        ex.id, status=Status.SUCCEEDED, finished_at=BASE_T + 50, exit_code=0,
        output_bytes=123, truncated=True, dropped_bytes=7, reason="bad \udc80 \x00 text",
    )  # fmt: skip
    got = storage.get(ex.id)
    assert (got.status, got.started_at, got.finished_at, got.exit_code) == (
        Status.SUCCEEDED, BASE_T + 5, BASE_T + 50, 0,
    )  # fmt: skip
    assert (got.output_bytes, got.truncated, got.dropped_bytes) == (123, True, 7)
    assert (got.isolation, got.dispatcher_id, got.duration_ms) == ("bubblewrap", "d1", 45)
    assert got.reason == "bad \\udc80 \\x00 text"
    storage.update(ex.id)  # nothing to change: still checks existence
    with pytest.raises(NotFound):
        storage.update(new_execution_id(), status=Status.FAILED)
    with pytest.raises(NotFound):
        storage.update(new_execution_id())
    with pytest.raises(TypeError, match="code"):
        storage.update(ex.id, code="x")
    with pytest.raises(InvalidRequest, match="status"):
        storage.update(ex.id, status="exploded")


def test_events_append_and_resume(storage: Storage) -> None:
    ex = make()
    storage.create(ex)
    first = [Event(0, BASE_T, "status", {"status": "queued"})]
    first += [
        Event(i, BASE_T + i, "stream", {"name": "stdout", "text": f"{i} 🚀\n"}) for i in range(1, 6)
    ]
    storage.append_events(ex.id, first)
    storage.append_events(ex.id, [])
    big = "x" * (8 << 20)
    storage.append_events(
        ex.id,
        [
            Event(6, BASE_T + 6, "display_data", {"data": {"image/png": big}, "metadata": {}}),
            Event(7, BASE_T + 7, "stream", {"name": "stderr", "text": "lone \udc80 surrogate\x00"}),
            Event(8, BASE_T + 8, "status", {"status": "succeeded", "nested": [{"k": "\ud800"}]}),
        ],
    )
    events = storage.events(ex.id)
    assert [e.seq for e in events] == list(range(9))
    assert events[:6] == first
    assert events[6].data["data"]["image/png"] == big
    assert events[7].data["text"] == "lone \\udc80 surrogate\x00"
    assert events[8].data["nested"] == [{"k": "\\ud800"}]
    assert [e.seq for e in storage.events(ex.id, after=4)] == [5, 6, 7, 8]
    assert [e.seq for e in storage.events(ex.id, after=2, limit=2)] == [3, 4]
    assert storage.events(ex.id, after=8) == []
    assert storage.events(new_execution_id()) == []
    with pytest.raises(StorageError, match="storing 1 event"):
        storage.append_events(ex.id, [Event(3, BASE_T, "stream", {})])  # seq already stored
    assert len(storage.events(ex.id)) == 9  # the failed batch left nothing behind
    with pytest.raises(NotFound):
        storage.append_events(new_execution_id(), [Event(0, BASE_T, "status", {})])


def test_concurrent_appends_from_threads(storage: Storage) -> None:
    ex = make()
    storage.create(ex)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            other = make(k)
            storage.create(other)
            for batch in range(10):
                seqs = range(k * 1000 + batch * 10, k * 1000 + batch * 10 + 10)
                storage.append_events(ex.id, [Event(s, BASE_T, "stream", {"s": s}) for s in seqs])
                storage.update(other.id, output_bytes=batch)
                storage.get(other.id)
        except BaseException as e:  # noqa: BLE001 -- whatever a thread raises is reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    seqs = [e.seq for e in storage.events(ex.id)]
    assert seqs == sorted(k * 1000 + i for k in range(4) for i in range(100))


def test_list_filters(storage: Storage) -> None:
    a1 = make(1, user="alice", status=Status.SUCCEEDED, tags=("x", "y"))
    b2 = make(2, user="bob", status=Status.FAILED, tags=("y",))
    a3 = make(3, user="alice", status=Status.RUNNING)
    b4 = make(4, user="bob", status=Status.SUCCEEDED, tags=("x",))
    for ex in (a1, b2, a3, b4):
        storage.create(ex)

    def ids(**kw) -> list[str]:
        page, cursor = storage.list(**kw)
        assert cursor is None
        return [e.id for e in page]

    assert ids() == [b4.id, a3.id, b2.id, a1.id]
    assert ids(user="alice") == [a3.id, a1.id]
    assert ids(status=Status.SUCCEEDED) == [b4.id, a1.id]
    assert ids(status=["failed", Status.RUNNING]) == [a3.id, b2.id]
    assert ids(tag="x") == [b4.id, a1.id]
    assert ids(tag="y", user="bob") == [b2.id]
    assert ids(tag="nope") == []
    assert ids(since=BASE_T + 2) == [b4.id, a3.id, b2.id]
    assert ids(until=BASE_T + 3) == [b2.id, a1.id]
    assert ids(since=BASE_T + 2, until=BASE_T + 4, user="alice") == [a3.id]
    page, _ = storage.list(tag="x")
    assert page[1].request.tags == ("x", "y")
    with pytest.raises(InvalidRequest, match="status"):
        storage.list(status="bogus")
    with pytest.raises(InvalidRequest, match="since"):
        storage.list(since="yesterday")
    assert storage.list(user="\udc80 \x00", tag="\ud800") == ([], None)
    for bad in (0, -1, 1001, True):
        with pytest.raises(InvalidRequest, match="limit"):
            storage.list(limit=bad)


@pytest.mark.parametrize("filters", [{}, {"user": "u1"}, {"status": ["succeeded", "failed"]}])
def test_cursor_pagination_no_duplicates_or_gaps(storage: Storage, filters: dict) -> None:
    made = []
    for i in range(120):
        # groups of 3 share a created_at, so ties are broken by id
        ex = make(i // 3, user=f"u{i % 2}", status=[Status.SUCCEEDED, Status.FAILED][i % 2])
        storage.create(ex)
        made.append(ex)
    expected = [
        e.id
        for e in sorted(made, key=lambda e: (e.created_at, e.id), reverse=True)
        if filters.get("user", e.user) == e.user
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = storage.list(cursor=cursor, limit=7, **filters)
        seen += [e.id for e in page]
        pages += 1
        if cursor is None:
            break
        # a row created meanwhile (newer) must not shift the pages
        storage.create(make(10_000 + pages, user="u1", status=Status.SUCCEEDED))
    assert seen == expected
    assert pages == -(-len(expected) // 7)


def test_bad_cursor_is_invalid_request(storage: Storage) -> None:
    for bad in ("", "!!!", "not a cursor", "e30", encode_cursor(1, "x") + "%", "W10", "a" * 500):
        with pytest.raises(InvalidRequest, match="cursor"):
            storage.list(cursor=bad)
    page, cursor = storage.list(cursor=encode_cursor(BASE_T, "zzzz"))
    assert (page, cursor) == ([], None)


def test_stats(storage: Storage) -> None:
    empty = storage.stats()
    assert empty == {
        "total": 0,
        "by_status": {s.value: 0 for s in Status},
        "duration_ms": {"p50": None, "p95": None, "count": 0},
    }
    for d in range(1, 101):  # durations 1..100 ms, shuffled across statuses
        status = [Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED][d % 4]
        storage.create(make(d, status=status, started_at=BASE_T, finished_at=BASE_T + d))
    storage.create(make(200, status=Status.RUNNING, started_at=BASE_T))
    storage.create(make(201, status=Status.CANCELLED))  # cancelled while queued: no duration
    storage.create(make(202, user="bob", status=Status.SUCCEEDED, started_at=0, finished_at=10**6))
    st = storage.stats(user="alice")
    assert st["total"] == 102
    assert st["by_status"] == {
        "queued": 0, "starting": 0, "running": 1, "succeeded": 25,
        "failed": 25, "timed_out": 25, "cancelled": 26,
    }  # fmt: skip
    assert st["duration_ms"] == {"p50": 50, "p95": 95, "count": 100}
    assert storage.stats()["duration_ms"]["count"] == 101
    assert storage.stats(user="bob")["duration_ms"] == {"p50": 10**6, "p95": 10**6, "count": 1}
    assert storage.stats(user="alice", since=BASE_T + 91)["duration_ms"] == {
        "p50": 95, "p95": 100, "count": 10,
    }  # fmt: skip


def test_unfinished_oldest_first(storage: Storage) -> None:
    done = make(0, status=Status.SUCCEEDED)
    running = make(1, status=Status.RUNNING)
    queued = make(2, status=Status.QUEUED)
    starting = make(3, status=Status.STARTING)
    for ex in (starting, done, queued, running):
        storage.create(ex)
    assert [e.id for e in storage.unfinished()] == [running.id, queued.id, starting.id]


def test_cancel_requests(storage: Storage) -> None:
    a, b, c = make(1), make(2), make(3)
    for ex in (a, b, c):
        storage.create(ex)
    assert storage.cancel_requested([a.id, b.id]) == set()
    storage.request_cancel(a.id)
    storage.request_cancel(a.id)  # idempotent
    storage.request_cancel(c.id)
    ids = [a.id, b.id, c.id, "nonsense", "\udc80", new_execution_id()]
    assert storage.cancel_requested(ids) == {a.id, c.id}
    assert storage.cancel_requested([]) == set()
    many = [new_execution_id() for _ in range(1200)] + [c.id]
    assert storage.cancel_requested(many) == {c.id}
    with pytest.raises(NotFound):
        storage.request_cancel(new_execution_id())


@pytest.mark.parametrize(
    "bad",
    ["", "nope", "0" * 36, "x" * 10_000, "a\x00b", "\udc80", "🚀", "'; DROP TABLE x", None, 42],
)
def test_not_found_on_unknown_and_malformed_ids(storage: Storage, bad) -> None:
    with pytest.raises(NotFound, match="crucible history") as info:
        storage.get(bad)
    assert len(info.value.message) < 300
    with pytest.raises(NotFound):
        storage.update(bad, status=Status.FAILED)
    with pytest.raises(NotFound):
        storage.request_cancel(bad)
    with pytest.raises(NotFound):
        storage.append_events(bad, [Event(0, 0, "status", {})])
    assert storage.events(bad) == []


def _version(url: str) -> list[str]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
    finally:
        engine.dispose()


def test_migrate_empty_then_noop(db_url: str) -> None:
    with Storage(db_url) as s:
        s.migrate()
        assert _version(db_url) == ["0001"]
        ex = make()
        s.create(ex)
        s.migrate()
        s.migrate()
        assert _version(db_url) == ["0001"]
        assert s.get(ex.id) == ex
    engine = create_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert names == {"executions", "execution_tags", "events", VERSION_TABLE}


def test_alembic_head_matches_models(storage: Storage, db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
            )
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_concurrent_migrations_from_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = (
        "import sys\nfrom crucible_jupyter.storage import Storage\n"
        "s = Storage(sys.argv[1])\ns.migrate()\ns.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, url], env=env, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    assert _version(url) == ["0001"]
    with Storage(url) as s:
        s.migrate()
        assert s.list() == ([], None)


def test_errors_name_the_failure_and_hide_the_password() -> None:
    s = Storage("postgresql://crucible:s3cr3t-pw@127.0.0.1:1/nowhere")
    try:
        assert "s3cr3t" not in repr(s)
        assert "s3cr3t" not in s.url
        assert s.url.startswith("postgresql+psycopg://crucible:***@")
        with pytest.raises(StorageError, match="reading execution") as info:
            s.get(new_execution_id())
        assert "s3cr3t" not in str(info.value)
        with pytest.raises(StorageError, match="migrating"):
            s.migrate()
    finally:
        s.close()


def test_unusable_sqlite_file_is_storage_error(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with Storage(f"sqlite:///{tmp_path / 'dir.db'}") as s, pytest.raises(StorageError):
        s.migrate()


@pytest.mark.parametrize("url", ["mysql://u:pw@h/db", "not a url", "nosuchdb://x"])
def test_unsupported_url_is_storage_error(url: str) -> None:
    with pytest.raises(StorageError) as info:
        Storage(url)
    assert "pw" not in str(info.value)


def test_default_url_in_jupyter_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    url = default_url()
    assert url == f"sqlite:///{tmp_path / 'data' / 'crucible' / 'crucible.db'}"
    assert (tmp_path / "data" / "crucible").is_dir()
    with Storage() as s:
        assert s.url == url
        s.migrate()
        assert s.list() == ([], None)


def test_sqlite_pragmas(tmp_path: Path) -> None:
    with Storage(f"sqlite:///{tmp_path / 'p.db'}") as s:
        s.migrate()  # raises busy_timeout while migrating, then puts it back
        with s._engine.connect() as conn:
            values = [
                conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            ]
        assert values == ["wal", 5000, 1, 1]
