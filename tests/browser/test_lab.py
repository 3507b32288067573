"""The newcomer's story in a real browser (issue 3's "Done when").

JupyterLab as ``dev/start`` runs it (local sandbox, SQLite), headless Chromium clicking and
typing into it: a ``%%crucible`` cell and a cell of the "Python (Crucible isolated)" kernel
stream their output into the page while they run, and both executions are then found
through the REST API with their notebook path and cell id. A failing cell shows the remote
traceback; the example notebooks run from the Run menu.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.helpers.lab import (
    CRUCIBLE,
    FINISHED,
    PYTHON3,
    Cell,
    LabPage,
    LabServer,
    finished,
    write_notebook,
)
from tests.helpers.net import wait_until

pytestmark = pytest.mark.browser

TAG = "browser-e2e"

TICKS = f"""%%crucible --tag {TAG} --name ticks
import time
for i in range(5):
    print(f"tick {{i}}", flush=True)
    time.sleep(0.6)
"""

KERNEL_TICKS = f"""%%crucible --tag {TAG} --name kernel-ticks
import time
for i in range(4):
    print(f"kernel tick {{i}}", flush=True)
    time.sleep(0.6)
print("kernel done", flush=True)
"""

FAILING = f"""%%crucible --tag {TAG} --name failing --timeout 30
def parse(text):
    return int(text)

parse("forty-two")
"""

KERNEL_FAILING = f"""%%crucible --tag {TAG} --name kernel-failing
def divide(a, b):
    return a / b

divide(1, 0)
"""


@pytest.fixture(scope="module")
def notebooks(lab: LabServer) -> dict[str, list[str]]:
    """The notebooks these tests open, by name: their code cells' ids."""
    return {
        "magic.ipynb": write_notebook(
            lab, "magic.ipynb", "python3", ["%load_ext crucible_jupyter", TICKS, FAILING]
        ),
        "kernel.ipynb": write_notebook(
            lab, "kernel.ipynb", "crucible", [KERNEL_TICKS, KERNEL_FAILING]
        ),
    }


def assert_streamed_live(history: list[Cell], first: str, last: str) -> None:
    """Some state of the cell showed ``first`` while the cell was still running and before
    ``last`` or a final status line was there, with a live status line saying running."""
    early = [c for c in history if first in c.text and last not in c.text]
    assert early, (
        f"{first!r} never showed before {last!r}: the output was not streamed live."
        f" States seen: {history!r}"
    )
    assert all(c.running and not FINISHED.search(c.text) for c in early), early
    assert any("crucible · running" in c.text for c in early), early
    final = history[-1]
    assert last in final.text, final
    assert final.done, final


def recorded(lab: LabServer, execution_id: str) -> dict[str, Any]:
    """The execution as the REST API lists it (GET executions?tag=...), checked against
    GET executions/{id}."""
    page = lab.api(f"executions?tag={TAG}&limit=100")
    listed = {e["id"]: e for e in page["executions"]}
    assert execution_id in listed, (execution_id, sorted(listed))
    one = lab.api(f"executions/{execution_id}")
    assert one["status"] == listed[execution_id]["status"]
    return one


def stdout_of(execution: dict[str, Any]) -> str:
    """The recorded stdout of an execution."""
    return "".join(
        e.get("text", "")
        for e in execution.get("events", [])
        if e.get("type") == "stream" and e.get("name") == "stdout"
    )


def test_magic_and_kernel_cells_stream_live_and_are_recorded(
    page: LabPage, lab: LabServer, notebooks: dict[str, list[str]]
) -> None:
    # a %%crucible cell in a notebook on the ordinary Python kernel
    page.open("magic.ipynb", PYTHON3)
    page.run_cell(0)
    page.wait_cell(0, lambda c: c.done, "%load_ext to finish")
    assert not page.cell(0).stderr, page.cell(0)

    watch = page.watch(1)
    page.run_cell(1)
    magic = page.wait_cell(1, finished, "the %%crucible cell to finish")
    assert_streamed_live(page.history(watch), "tick 0", "tick 4")
    icon, state, magic_id = finished(magic).groups()
    assert (icon, state) == ("✔", "succeeded"), magic
    assert re.search(r"succeeded in \d+\.\d\d s", magic.text), magic
    assert [line for line in magic.text.splitlines() if line.startswith("tick")] == [
        f"tick {i}" for i in range(5)
    ], magic
    assert not magic.stderr, magic

    # a cell of the "Python (Crucible isolated)" kernel
    page.open("kernel.ipynb", CRUCIBLE)
    watch = page.watch(0)
    page.run_cell(0)
    kernel = page.wait_cell(0, finished, "the crucible kernel's cell to finish")
    assert_streamed_live(page.history(watch), "kernel tick 0", "kernel done")
    icon, state, kernel_id = finished(kernel).groups()
    assert (icon, state) == ("✔", "succeeded"), kernel
    assert kernel.prompt == "[1]:", kernel
    assert not kernel.stderr, kernel

    # both found through the REST API, with the notebook they came from
    magic_rec = recorded(lab, magic_id)
    kernel_rec = recorded(lab, kernel_id)
    for rec, path, cell_id, name in (
        (magic_rec, "magic.ipynb", notebooks["magic.ipynb"][1], "ticks"),
        (kernel_rec, "kernel.ipynb", notebooks["kernel.ipynb"][0], "kernel-ticks"),
    ):
        assert rec["status"] == "succeeded", rec
        assert rec["exit_code"] == 0, rec
        assert rec["name"] == name, rec
        assert TAG in rec["tags"], rec
        assert rec["notebook"]["path"] == path, rec["notebook"]
        assert rec["notebook"]["cell_id"] == cell_id, rec["notebook"]
        assert rec["notebook"]["kernel_id"], rec["notebook"]
    assert stdout_of(magic_rec) == "".join(f"tick {i}\n" for i in range(5))
    assert stdout_of(kernel_rec) == "".join(f"kernel tick {i}\n" for i in range(4)) + (
        "kernel done\n"
    )
    # the %%crucible option line is not part of the code the kernel ran
    assert not kernel_rec["code"].startswith("%%crucible"), kernel_rec["code"]
    # recorded in this run's own database, not the user's
    assert lab.db.stat().st_size > 0


def test_failing_cells_show_the_remote_traceback(
    page: LabPage, lab: LabServer, notebooks: dict[str, list[str]]
) -> None:
    page.open("magic.ipynb", PYTHON3)
    page.run_cell(0)
    page.wait_cell(0, lambda c: c.done, "%load_ext to finish")
    page.run_cell(2)
    cell = page.wait_cell(2, lambda c: finished(c) and c.stderr, "the failing cell's traceback")
    icon, state, magic_id = finished(cell).groups()
    assert (icon, state) == ("✘", "failed"), cell
    # the cell's own frames and error, not the magic's local stack
    assert "ValueError" in cell.stderr, cell.stderr
    assert "forty-two" in cell.stderr, cell.stderr
    assert "parse" in cell.stderr, cell.stderr
    assert "return int(text)" in cell.stderr, cell.stderr
    assert f"crucible execution {magic_id}" in cell.stderr, cell.stderr
    assert "magic.py" not in cell.stderr, cell.stderr

    page.open("kernel.ipynb", CRUCIBLE)
    page.run_cell(1)
    cell = page.wait_cell(1, lambda c: finished(c) and c.stderr, "the kernel's traceback")
    icon, state, kernel_id = finished(cell).groups()
    assert (icon, state) == ("✘", "failed"), cell
    assert "ZeroDivisionError" in cell.stderr, cell.stderr
    assert "divide" in cell.stderr, cell.stderr
    assert "return a / b" in cell.stderr, cell.stderr
    assert f"crucible execution {kernel_id}" in cell.stderr, cell.stderr

    for execution_id, path in ((magic_id, "magic.ipynb"), (kernel_id, "kernel.ipynb")):
        rec = recorded(lab, execution_id)
        assert rec["status"] == "failed", rec
        assert rec["notebook"]["path"] == path, rec["notebook"]
        errors = [e for e in rec["events"] if e["type"] == "error"]
        assert errors, errors
        assert errors[0]["ename"] in ("ValueError", "ZeroDivisionError"), errors


@pytest.mark.parametrize(
    ("path", "kernel", "fails_last"),
    [("crucible-demo.ipynb", PYTHON3, True), ("crucible-kernel.ipynb", CRUCIBLE, False)],
)
def test_example_notebook_runs_from_the_run_menu(
    page: LabPage, lab: LabServer, path: str, kernel: str, fails_last: bool
) -> None:
    """Run → Run All Cells on an example notebook as ``dev/start`` serves it: every cell runs;
    the demo's last cell fails on purpose (it says so) and stops there with its traceback."""
    page.open(path, kernel)
    n = len(page.cells())
    page.menu("Run", "Run All Cells")
    cells = wait_until(
        lambda: (cells := page.cells()) and all(c.done for c in cells[:n]) and cells,
        120,
        f"every cell of {path} to run",
    )
    last = cells[n - 1]
    for i, cell in enumerate(cells[: n - 1]):
        assert not finished(cell) or finished(cell).group(2) == "succeeded", (i, cell)
        assert "Traceback" not in cell.stderr, (i, cell)
        assert "Error" not in cell.stderr, (i, cell)
    if fails_last:
        assert finished(last), last
        assert finished(last).group(2) == "failed", last
        assert "Error" in last.stderr, last
        assert any(c.images for c in cells), "the demo's figure did not show as an image"
    else:
        assert finished(last) or last.done, last
        assert not last.stderr, last
    ids = [m.group(3) for c in cells if (m := finished(c))]
    assert ids, cells
    for execution_id in ids:
        rec = lab.api(f"executions/{execution_id}")
        assert rec["notebook"]["path"] == path, rec["notebook"]
