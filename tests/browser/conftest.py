"""A real ``jupyter lab`` and Debian's headless Chromium, driven by Selenium.

``lab`` (one per session) starts the venv's ``jupyter lab`` the way ``dev/start`` does
(``--allow-root`` as root, ``--no-browser``) on a free port with a token, serving a
temporary root that holds copies of ``examples/*.ipynb`` and the notebooks these tests
write. Everything it writes is private to the run: SQLite through ``CRUCIBLE_DB_URL`` and
its own Jupyter config, data and runtime dirs and IPython dir. The crucible kernelspec
and server extension come from the installed package (``sys.prefix``), as a newcomer
gets them. It is shut down through ``POST /api/shutdown`` at the end.

``browser`` (one per session) is ``/usr/bin/chromium`` headless through
``/usr/bin/chromedriver`` (both from Debian: ``apt-get install chromium chromium-driver``,
which ``dev/setup`` does). Selenium Manager is never used, so nothing is downloaded. A
missing or broken browser fails the tests; it does not skip them.

``page`` (per test) opens notebooks in a fresh JupyterLab workspace; when a test fails,
it saves a screenshot, the page's HTML and the server's log into that test's tmp dir.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.lab import (
    CHROMEDRIVER,
    CHROMIUM,
    CHROMIUM_ARGS,
    INSTALL_HINT,
    REPO,
    LabPage,
    LabServer,
)
from tests.helpers.reports import failed


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """The running JupyterLab, its root holding copies of the example notebooks."""
    server = LabServer(tmp_path_factory.mktemp("lab"))
    for notebook in sorted((REPO / "examples").glob("*.ipynb")):
        shutil.copy(notebook, server.root / notebook.name)
    try:
        server.wait_ready()
        yield server
    finally:
        problem = server.stop()
    if problem:
        pytest.fail(f"{problem}:\n{server.log_path.read_text(errors='replace')[-5000:]}")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through Debian's chromedriver (Selenium)."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            pytest.fail(f"{path} not found: {INSTALL_HINT}", pytrace=False)
    profile = tempfile.mkdtemp(prefix="crucible-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in [*CHROMIUM_ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    # JupyterLab asks before leaving a page with unsaved notebooks: leave anyway
    options.unhandled_prompt_behavior = "accept"
    service = Service(str(CHROMEDRIVER))
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as e:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.fail(
            f"headless Chromium did not start ({CHROMIUM} through {CHROMEDRIVER}): {e.msg}\n"
            f"{INSTALL_HINT}; chromium and chromium-driver must be the same version",
            pytrace=False,
        )
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(
    request: pytest.FixtureRequest, browser: Any, lab: LabServer, tmp_path: Path
) -> Iterator[Any]:
    """A :class:`LabPage` on the browser; evidence kept on failure."""
    lab_page = LabPage(browser, lab)
    try:
        yield lab_page
    finally:
        if failed(request.node):
            with contextlib.suppress(Exception):
                browser.save_screenshot(str(tmp_path / "screenshot.png"))
            with contextlib.suppress(Exception):
                (tmp_path / "page.html").write_text(browser.page_source)
            (tmp_path / "jupyter-lab.log").write_text(lab.log())
            print(f"browser evidence (screenshot.png, page.html, jupyter-lab.log) in {tmp_path}")
        lab_page.leave()
        lab.close_sessions()
