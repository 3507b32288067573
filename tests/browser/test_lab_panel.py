"""The JupyterLab extension in a real browser: the "Crucible" history panel and the queue in
the status bar.

An execution submitted through the REST API appears in the open panel as running without a
reload (told by the live change feed), its output streams into the expanded row, the panel's
Cancel button stops it, the row turns cancelled and the REST API records it so; the status
bar counts it while it runs.
The extension loads without console errors and ``jupyter labextension list`` reports it
enabled and OK. The extension must be built and installed (``dev/setup`` does both).
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.lab import LabServer
from tests.helpers.net import wait_until

pytestmark = pytest.mark.browser

TAG = "browser-panel"
SLEEPER = """import time
print("panel tick", flush=True)
time.sleep(60)
print("never printed", flush=True)
"""

# Console errors and uncaught exceptions of every page loaded after this, kept in the page.
_CAPTURE_ERRORS_JS = """
window.__crucibleConsoleErrors = [];
const original = console.error;
console.error = function (...args) {
  window.__crucibleConsoleErrors.push(args.map(a => (a && a.stack) || String(a)).join(' '));
  return original.apply(this, args);
};
window.addEventListener('error', e => window.__crucibleConsoleErrors.push(String(e.message)));
window.addEventListener('unhandledrejection',
  e => window.__crucibleConsoleErrors.push('unhandled rejection: ' + String(e.reason)));
"""

_ROW = '.jp-CrucibleHistory-row[data-execution-id="{}"]'


@pytest.fixture
def panel(browser: Any, lab: LabServer) -> Iterator[Any]:
    """JupyterLab in a fresh workspace with the Crucible panel open; the driver. Console
    errors are captured from the first script on."""
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": _CAPTURE_ERRORS_JS}
    )
    try:
        browser.get(f"{lab.url}lab/workspaces/{uuid.uuid4().hex[:12]}?token={lab.token}")
        tab = wait_until(
            lambda: browser.find_elements(
                "css selector", '.jp-SideBar .lm-TabBar-tab[data-id="crucible-history"]'
            ),
            60,
            "the Crucible tab in the left sidebar (extension not built or linked? dev/setup)",
        )
        tab[0].click()
        wait_until(
            lambda: browser.execute_script(
                "const p = document.getElementById('crucible-history');"
                "return p && !p.classList.contains('lm-mod-hidden')"
                " && !!p.querySelector('.jp-CrucibleHistory-header');"
            ),
            30,
            "the Crucible panel to show",
        )
        yield browser
    finally:
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
        )
        browser.get("about:blank")


def row_state(driver: Any, execution_id: str) -> dict[str, Any] | None:
    """What the panel shows of one execution: status, title, text, a Cancel button."""
    return driver.execute_script(
        """
        const row = document.querySelector(arguments[0]);
        if (!row) return null;
        const q = s => row.querySelector(s);
        return {
          status: row.dataset.status,
          badge: q('.jp-CrucibleHistory-badge').textContent,
          name: q('.jp-CrucibleHistory-name').textContent,
          meta: q('.jp-CrucibleHistory-meta').textContent,
          output: q('.jp-CrucibleHistory-output') ? q('.jp-CrucibleHistory-output').textContent : null,
          cancel: !!q('.jp-CrucibleHistory-cancel'),
        };
        """,
        _ROW.format(execution_id),
    )


def status_bar(driver: Any) -> str:
    """The crucible item of the status bar."""
    return driver.execute_script(
        "const item = document.querySelector('.jp-CrucibleQueueStatus');"
        "return item ? item.textContent : '';"
    )


def queue_text(lab: LabServer) -> str:
    """What the status bar should say, from GET queue."""
    queue = lab.api("queue")
    return f"crucible: {queue['running']} running, {queue['queued']} queued"


def test_panel_shows_a_running_execution_live_and_cancels_it(panel: Any, lab: LabServer) -> None:
    driver = panel
    wait_until(lambda: status_bar(driver) == queue_text(lab), 30, "the queue in the status bar")
    # connected to the change feed: the panel then refreshes on changes, otherwise only
    # every 15 s (so a row that shows up within the first wait below came through the feed)
    wait_until(
        lambda: driver.execute_script(
            "const h = document.querySelector('#crucible-history .jp-CrucibleHistory-header');"
            "return h && h.dataset.live === 'true';"
        ),
        30,
        "the panel to connect to the live change feed",
    )

    created = lab.call(
        "POST",
        "crucible/api/executions",
        {"code": SLEEPER, "name": "panel sleeper", "tags": [TAG], "timeout": 120},
    )
    execution_id = created["id"]

    # appears without a reload (told by the feed), then shows it running
    wait_until(
        lambda: row_state(driver, execution_id),
        10,
        "the submitted execution to appear in the panel (through the change feed)",
    )
    state = wait_until(
        lambda: (s := row_state(driver, execution_id)) and s["status"] == "running" and s,
        30,
        "the submitted execution to show as running in the panel",
    )
    assert state["badge"] == "running", state
    assert state["name"] == "panel sleeper", state
    assert state["cancel"], state
    first = driver.find_element("css selector", ".jp-CrucibleHistory-row")
    assert first.get_attribute("data-execution-id") == execution_id  # newest first

    # the status bar counts it
    text = wait_until(
        lambda: (t := status_bar(driver)) == queue_text(lab) and t, 30, "the status bar"
    )
    assert re.fullmatch(r"crucible: [1-9]\d* running, \d+ queued", text), text

    # expanded, it shows its code and its output as it arrives
    driver.find_element(
        "css selector", _ROW.format(execution_id) + " .jp-CrucibleHistory-summary"
    ).click()
    wait_until(
        lambda: "panel tick" in ((row_state(driver, execution_id) or {}).get("output") or ""),
        30,
        "the running execution's output in the expanded row",
    )
    code = driver.find_element(
        "css selector", _ROW.format(execution_id) + " .jp-CrucibleHistory-code"
    )
    assert "time.sleep(60)" in code.text

    # cancelled from the panel
    driver.find_element(
        "css selector", _ROW.format(execution_id) + " .jp-CrucibleHistory-cancel"
    ).click()
    state = wait_until(
        lambda: (s := row_state(driver, execution_id)) and s["status"] == "cancelled" and s,
        30,
        "the row to turn cancelled",
    )
    assert state["badge"] == "cancelled", state
    assert not state["cancel"], state
    assert "never printed" not in (state["output"] or ""), state

    recorded = lab.api(f"executions/{execution_id}")
    assert recorded["status"] == "cancelled", recorded
    assert any(
        e["type"] == "stream" and "panel tick" in e.get("text", "") for e in recorded["events"]
    ), recorded["events"]
    wait_until(
        lambda: (
            status_bar(driver) == queue_text(lab) and "crucible: 0 running" in status_bar(driver)
        ),
        30,
        "the status bar to count nothing running",
    )

    # the status filter
    select = driver.find_element("css selector", ".jp-CrucibleHistory-filter")
    from selenium.webdriver.support.ui import Select

    Select(select).select_by_value("succeeded")
    wait_until(
        lambda: (
            row_state(driver, execution_id) is None
            and all(
                s == "succeeded"
                for s in driver.execute_script(
                    "return Array.from(document.querySelectorAll('.jp-CrucibleHistory-row'))"
                    ".map(r => r.dataset.status);"
                )
            )
        ),
        30,
        "only succeeded executions to be listed",
    )
    Select(select).select_by_value("cancelled")
    wait_until(lambda: row_state(driver, execution_id), 30, "the cancelled execution again")

    errors = driver.execute_script("return window.__crucibleConsoleErrors;")
    ours = [e for e in errors if "crucible" in e.lower()]
    assert not ours, ours


def test_extension_loads_without_console_errors(panel: Any) -> None:
    errors = panel.execute_script("return window.__crucibleConsoleErrors;")
    assert isinstance(errors, list)
    ours = [e for e in errors if "crucible" in e.lower()]
    assert not ours, f"console errors from the crucible extension: {ours}; all: {errors}"
    # the plugin activated: its status bar item and its command exist
    assert panel.execute_script("return !!document.querySelector('.jp-CrucibleQueueStatus');")


def test_labextension_list_shows_crucible_enabled_and_ok() -> None:
    jupyter = Path(sys.prefix) / "bin" / "jupyter"
    result = subprocess.run(
        [str(jupyter), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    line = next((line for line in out.splitlines() if "crucible-jupyter" in line), None)
    assert line is not None, out
    assert re.search(r"crucible-jupyter v\S+ enabled\s+OK", line), line
