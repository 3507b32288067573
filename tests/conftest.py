"""Shared database fixtures: a throwaway real PostgreSQL, and ``storage`` on both databases.

``postgres_url`` (session) uses ``CRUCIBLE_TEST_POSTGRES_URL`` when set (its role must be
allowed to CREATE DATABASE); otherwise it starts a private PostgreSQL server from
``/usr/lib/postgresql/*/bin`` in a temporary directory, listening on 127.0.0.1 only, and
removes it at the end. Missing server binaries are a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# before the first import of a helper: plain ``assert``s in helpers report like a test's
pytest.register_assert_rewrite("tests.helpers")

from crucible_jupyter.storage import Storage  # noqa: E402
from tests.helpers.cluster import (  # noqa: E402
    RESTART_SKIP_REASON,
    ClusterUnreachable,
    Kube,
    cluster_required,
    connect,
    restart_allowed,
)
from tests.helpers.net import free_port  # noqa: E402
from tests.helpers.postgres import admin, pg_bindir  # noqa: E402
from tests.helpers.reports import PHASE_REPORTS  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Keep each phase's report in the item's stash (``tests.helpers.reports.failed``)."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that restart the shared cluster run after all others, whatever their file
    name, and skip (with the reason) unless restarts are allowed."""
    restarts = [item for item in items if item.get_closest_marker("cluster_restart")]
    if not restarts:
        return
    items[:] = [item for item in items if item not in restarts] + restarts
    if not restart_allowed():
        for item in restarts:
            item.add_marker(pytest.mark.skip(reason=RESTART_SKIP_REASON))


@pytest.fixture(autouse=True)
def _environment_left_as_found() -> Iterator[None]:
    """A test (with its fixtures) leaves ``os.environ`` as it found it: a variable left
    behind (a server's CRUCIBLE_SERVER_URL, say) would change what later tests run against,
    so the outcome would depend on their order. Restored, and the test errors."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(
        key
        for key in before.keys() | after.keys()
        if before.get(key) != after.get(key) and key != "PYTEST_CURRENT_TEST"  # pytest's own
    )
    if changed:
        for key in changed:
            if key in before:
                os.environ[key] = before[key]
            else:
                del os.environ[key]
        pytest.fail(f"the test left environment variables changed: {changed}", pytrace=False)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL (``postgresql+psycopg://``) of the ``crucible_test`` database on a throwaway server."""
    given = os.environ.get("CRUCIBLE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    bindir = pg_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: install them"
            " with `apt-get install postgresql` (or set CRUCIBLE_TEST_POSTGRES_URL)",
            pytrace=False,
        )
    base = Path(tempfile.mkdtemp(prefix="crucible-pg-"))
    data, sock, log = base / "data", base / "sock", base / "postgres.log"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            pytest.fail(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{tail}",
                pytrace=False,
            )

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-locale", "--no-sync")  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {sock}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
            "-t", "60", "start")  # fmt: skip
        started = True
        server = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        admin(f"{server}/postgres", "CREATE DATABASE crucible_test")
        yield f"{server}/crucible_test"
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database for one test (dropped afterwards)."""
    from sqlalchemy.engine import make_url

    name = f"crucible_t_{uuid.uuid4().hex[:16]}"
    admin(postgres_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database, once per backend: a SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crucible.db'}"
    return request.getfixturevalue("postgres_db")


@pytest.fixture
def storage(db_url: str) -> Iterator[Storage]:
    """A migrated :class:`Storage` on a fresh database (closed after the test)."""
    s = Storage(db_url)
    s.migrate()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def make_dispatcher(tmp_path: Path):
    """Start real dispatchers; all are stopped at the end of the test.

    ``make_dispatcher(db_url=None, local={...}, kubernetes={...}, **traits)``: ``traits`` set
    ``CrucibleDispatcher``; ``local`` and ``kubernetes`` set the backends' traits.
    """
    from traitlets.config import Config

    from crucible_jupyter.dispatcher import Dispatcher

    started: list[Dispatcher] = []

    async def make(
        db_url: str | None = None,
        local: dict | None = None,
        kubernetes: dict | None = None,
        **traits,
    ) -> Dispatcher:
        config = Config()
        config.CrucibleDispatcher.db_url = db_url or f"sqlite:///{tmp_path}/crucible.db"
        for section, values in (
            ("CrucibleDispatcher", traits),
            ("CrucibleLocalBackend", local or {}),
            ("CrucibleKubernetesBackend", kubernetes or {}),
        ):
            for key, value in values.items():
                setattr(config[section], key, value)
        dispatcher = Dispatcher(config=config)
        await dispatcher.start()
        started.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in reversed(started):
        await dispatcher.stop()


@pytest.fixture(scope="session")
def kube() -> Kube:
    """The dev Kubernetes cluster (``tests.helpers.cluster.connect``), for tests/cluster and
    tests/k8s alike: skipped with the reason when it is unreachable, failed instead under
    ``CRUCIBLE_CLUSTER_REQUIRED=1``."""
    try:
        return connect()
    except ClusterUnreachable as e:
        if cluster_required():
            pytest.fail(
                f"the dev cluster is required (CRUCIBLE_CLUSTER_REQUIRED=1): {e}", pytrace=False
            )
        pytest.skip(f"the dev cluster is not reachable ({e}); start it: dev/cluster/cluster up")
