"""JupyterLab and the browser that drives it: a ``jupyter lab`` server in private dirs, a
page of it in Chromium (Selenium) read and clicked as a person does, notebooks written for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat

from tests.helpers.net import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "install Debian's `chromium` and `chromium-driver` (dev/setup does)"

# Chromium as root (no sandbox) on a machine whose network is closed: no background
# connections, component updates or sync, which would only be refused there.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]

# JupyterLab settings for the private config dir: no news/update toast over the notebook
# (it would also make the server try to reach the internet).
LAB_USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


class LabServer:
    """``jupyter lab`` from the venv, on a free port, in private dirs under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir()
        self.port = free_port()
        self.token = uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}/"
        self.db = base / "crucible.db"
        dirs = {
            "JUPYTER_CONFIG_DIR": base / "config",
            "JUPYTER_DATA_DIR": base / "data",
            "JUPYTER_RUNTIME_DIR": base / "runtime",
            "IPYTHONDIR": base / "ipython",
        }
        for d in dirs.values():
            d.mkdir()
        settings = dirs["JUPYTER_CONFIG_DIR"] / "lab" / "user-settings"
        for name, values in LAB_USER_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
        for key in ("CRUCIBLE_SERVER_URL", "CRUCIBLE_TOKEN", "CRUCIBLE_BACKEND", "KUBECONFIG"):
            env.pop(key, None)
        env.update({k: str(v) for k, v in dirs.items()})
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        env["CRUCIBLE_DB_URL"] = f"sqlite:///{self.db}"
        jupyter = Path(sys.prefix) / "bin" / "jupyter"
        args = [str(jupyter), "lab", "--no-browser"]
        if os.geteuid() == 0:
            args.append("--allow-root")
        args += [
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
        ]
        self.log_path = base / "jupyter-lab.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 -- closed by stop()
        self.proc = subprocess.Popen(
            args, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 90) -> None:
        """Until the server, the crucible API and the Lab page all answer."""
        deadline = time.monotonic() + timeout
        pending = ["api/status", "crucible/api/health", "lab"]
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"jupyter lab exited with {self.proc.returncode}:\n{self.log()}"
                )
            try:
                with urllib.request.urlopen(self._request("GET", pending[0]), timeout=5) as r:
                    if r.status == 200:
                        pending.pop(0)
                        continue
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"jupyter lab did not answer {pending[0]} in {timeout} s:\n{self.log()}"
                )
            time.sleep(0.2)

    def _request(self, method: str, path: str, body: Any = None) -> urllib.request.Request:
        data = json.dumps(body).encode() if body is not None else None
        if data is None and method == "POST":
            data = b""
        return urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """A call to the server (``path`` under the base URL) with the token; decoded JSON."""
        with urllib.request.urlopen(self._request(method, path, body), timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def api(self, path: str) -> Any:
        """``GET crucible/api/{path}`` with the token, decoded."""
        return self.call("GET", "crucible/api/" + path)

    def close_sessions(self) -> None:
        """Shut down every notebook session (and its kernel) the browser left."""
        for session in self.call("GET", "api/sessions") or []:
            with contextlib.suppress(urllib.error.HTTPError):
                self.call("DELETE", f"api/sessions/{session['id']}")

    def log(self) -> str:
        """The last part of the server's output."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> str | None:
        """Shut down through the API (kernels included), signals only as a fallback; what
        went wrong, if anything."""
        problem = None
        if self.proc.poll() is not None:
            problem = f"jupyter lab had already exited with {self.proc.returncode}"
        else:
            with contextlib.suppress(OSError):
                self.call("POST", "api/shutdown")
            try:
                self.proc.wait(30)
                if self.proc.returncode:
                    problem = f"jupyter lab exited with {self.proc.returncode} on shutdown"
            except subprocess.TimeoutExpired:
                problem = "jupyter lab did not stop within 30 s of POST /api/shutdown"
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        self._log.close()
        return problem


# One code cell as the page shows it: prompt ("[ ]:", "[*]:", "[3]:"), and each output's
# MIME type and text (textContent: independent of what the browser chose to lay out).
_CELLS_JS = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) return null;
window.crucibleCellState = window.crucibleCellState || function (cell) {
  const prompt = cell.querySelector('.jp-InputPrompt');
  return {
    prompt: prompt ? prompt.textContent.trim() : '',
    outputs: Array.from(cell.querySelectorAll('.jp-OutputArea-output')).map(o => ({
      mime: o.getAttribute('data-mime-type') || '',
      text: o.textContent,
      images: o.querySelectorAll('img').length,
    })),
  };
};
return Array.from(panel.querySelectorAll('.jp-Notebook .jp-CodeCell'))
  .map(c => window.crucibleCellState(c));
"""

# Record every state of one cell as the page changes it (a MutationObserver, so no state
# the page went through is missed however slowly this test polls).
_WATCH_JS = """
const [index, key] = arguments;
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
const cell = panel.querySelectorAll('.jp-Notebook .jp-CodeCell')[index];
window.crucibleWatch = window.crucibleWatch || {};
const log = window.crucibleWatch[key] = [];
const snap = () => {
  const state = window.crucibleCellState(cell);
  state.t = performance.now();
  const last = log[log.length - 1];
  if (!last || JSON.stringify([last.prompt, last.outputs])
               !== JSON.stringify([state.prompt, state.outputs])) log.push(state);
};
new MutationObserver(snap).observe(
  cell, {subtree: true, childList: true, characterData: true, attributes: true});
snap();
"""


class Cell:
    """A code cell's state in the page."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.prompt: str = state["prompt"]
        self.outputs: list[dict[str, Any]] = state["outputs"]
        self.t: float | None = state.get("t")

    @property
    def text(self) -> str:
        """All output text, in order."""
        return "\n".join(o["text"] for o in self.outputs)

    @property
    def stderr(self) -> str:
        """Text of stderr and error outputs (Lab renders both as the stderr MIME type)."""
        return "\n".join(
            o["text"] for o in self.outputs if o["mime"] == "application/vnd.jupyter.stderr"
        )

    @property
    def images(self) -> int:
        """Images among the outputs."""
        return sum(o["images"] for o in self.outputs)

    @property
    def running(self) -> bool:
        """Executing or queued: the prompt shows ``[*]``."""
        return self.prompt.startswith("[*]")

    @property
    def done(self) -> bool:
        """Executed: the prompt shows an execution count."""
        return re.match(r"\[\d+\]", self.prompt) is not None

    def __repr__(self) -> str:
        return f"Cell(prompt={self.prompt!r}, text={self.text[-400:]!r})"


class LabPage:
    """Drives JupyterLab in the browser as a person does: open, click, Shift+Enter, menus."""

    def __init__(self, driver: Any, lab: LabServer) -> None:
        self.driver = driver
        self.lab = lab

    def open(self, path: str, kernel: str, timeout: float = 60) -> None:
        """Open notebook ``path`` in a fresh workspace and wait until its kernel (display
        name ``kernel``) is idle."""
        workspace = uuid.uuid4().hex[:12]
        self.driver.get(
            f"{self.lab.url}lab/workspaces/{workspace}/tree/{path}?token={self.lab.token}"
        )
        wait_until(lambda: self.cells(), timeout, f"{path} to show its code cells")
        wait_until(
            lambda: self.driver.execute_script(
                "const bar = document.querySelector('.jp-StatusBar-Widget');"
                "return bar ? bar.textContent : '';"
            ).count(f"{kernel} | Idle"),
            timeout,
            f"kernel {kernel!r} of {path} to be idle (status bar)",
        )

    def cells(self) -> list[Cell]:
        """The open notebook's code cells."""
        return [Cell(s) for s in self.driver.execute_script(_CELLS_JS) or []]

    def cell(self, index: int) -> Cell:
        """Code cell ``index`` (0-based, code cells only)."""
        return self.cells()[index]

    def _cell_element(self, index: int) -> Any:
        from selenium.webdriver.common.by import By

        selector = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell"
        return self.driver.find_elements(By.CSS_SELECTOR, selector)[index]

    def run_cell(self, index: int) -> None:
        """Click into code cell ``index`` and press Shift+Enter."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        editor = self._cell_element(index).find_element(By.CSS_SELECTOR, ".jp-InputArea-editor")
        editor.click()
        ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(
            Keys.SHIFT
        ).perform()

    def menu(self, *labels: str) -> None:
        """Click through the menu bar: ``menu("Run", "Run All Cells")``."""
        from selenium.webdriver.common.by import By

        top, *items = labels
        bar = self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
        next(b for b in bar if b.text.strip() == top).click()
        for label in items:
            found = wait_until(
                lambda label=label: [
                    e
                    for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
                    if e.is_displayed() and e.text.split("\n")[0].strip() == label
                ],
                10,
                f"menu item {label!r}",
            )
            found[0].click()

    def save(self) -> None:
        """Click the notebook toolbar's save button."""
        from selenium.webdriver.common.by import By

        self.driver.find_element(
            By.CSS_SELECTOR,
            '.jp-NotebookPanel:not(.lm-mod-hidden) [data-jp-item-name="save"] jp-button',
        ).click()

    def watch(self, index: int) -> str:
        """Start recording every state of code cell ``index``; the key for :meth:`history`."""
        key = uuid.uuid4().hex
        self.cells()  # defines crucibleCellState
        self.driver.execute_script(_WATCH_JS, index, key)
        return key

    def history(self, key: str) -> list[Cell]:
        """Every distinct state the watched cell went through, in order."""
        states = self.driver.execute_script("return window.crucibleWatch[arguments[0]];", key)
        return [Cell(s) for s in states]

    def wait_cell(
        self, index: int, condition: Callable[[Cell], Any], what: str, timeout: float = 60
    ) -> Cell:
        """Poll code cell ``index`` until ``condition(cell)``; that cell."""

        def check() -> Cell | None:
            cells = self.cells()
            return cells[index] if len(cells) > index and condition(cells[index]) else None

        return wait_until(check, timeout, f"cell {index}: {what}")

    def leave(self) -> None:
        """Navigate away (to a blank page)."""
        with contextlib.suppress(Exception):
            self.driver.get("about:blank")


PYTHON3 = "Python 3 (ipykernel)"
CRUCIBLE = "Python (Crucible isolated)"
KERNELSPECS = {
    "python3": {"name": "python3", "display_name": PYTHON3, "language": "python"},
    "crucible": {"name": "crucible", "display_name": CRUCIBLE, "language": "python"},
}

FINISHED = re.compile(r"crucible · (\S+) (succeeded|failed|timed out|cancelled)[^·]* · (\S+)")


def write_notebook(lab: LabServer, name: str, kernel: str, sources: list[str]) -> list[str]:
    """Write ``name`` into the server's root with one code cell per source; the cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNELSPECS[kernel]
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, str(lab.root / name))
    return [cell.id for cell in nb.cells]


def finished(cell: Cell) -> re.Match[str] | None:
    """The cell's final crucible status line, once the cell itself is done."""
    return FINISHED.search(cell.text) if cell.done else None
