"""The `crucible` command, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture
def crucible(tmp_path):
    url = f"sqlite:///{tmp_path}/crucible.db"

    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "crucible_jupyter.cli", "--db-url", url, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def test_run_streams_and_mirrors_exit_code(crucible, tmp_path):
    cell = tmp_path / "cell.py"
    cell.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\n21 * 2\n")
    done = crucible("run", str(cell))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "out\n42\n"
    assert "err\n" in done.stderr
    assert "[crucible] succeeded" in done.stderr
    assert crucible("run", "-", input="import sys; sys.exit(4)").returncode == 4
    failed = crucible("run", "-", input="1/0")
    assert failed.returncode == 1
    assert "ZeroDivisionError" in failed.stderr
    timed = crucible("run", "--timeout", "1", "-", input="while True: pass")
    assert timed.returncode == 124
    assert "timed out after 1 s" in timed.stderr


def test_bad_input_is_a_clear_error(crucible, tmp_path):
    done = crucible("run", "--timeout", "-5", "-", input="print(1)")
    assert done.returncode == 2
    assert "timeout must be greater than 0" in done.stderr
    missing = crucible("run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr
    unknown = crucible("show", "not-an-id")
    assert unknown.returncode == 2
    assert "not-an-id" in unknown.stderr


def test_history_show_json_and_cancel(crucible):
    crucible("run", "--tag", "t1", "--name", "greeting", "-", input="print('hi')")
    hist = json.loads(crucible("history", "--json").stdout)
    (record,) = hist["executions"]
    assert record["status"] == "succeeded"
    assert record["tags"] == ["t1"]
    table = crucible("history").stdout
    assert record["id"] in table
    assert "greeting" in table
    shown = json.loads(crucible("show", record["id"], "--json").stdout)
    assert [e["text"] for e in shown["events"] if e["type"] == "stream"] == ["hi\n"]
    text = crucible("show", record["id"]).stdout
    assert "succeeded" in text
    assert "hi" in text
    again = crucible("cancel", record["id"])
    assert again.returncode == 2
    assert "already succeeded" in again.stderr


def test_doctor_reports_bubblewrap(crucible):
    done = crucible("doctor", "--json")
    report = json.loads(done.stdout)
    assert report["isolation"] == "bubblewrap", report
    assert done.returncode == 0
    human = crucible("doctor").stdout
    assert "isolation: bubblewrap" in human
    assert "[ok  ] warm sandboxes: 2 kept started, each for one cell" in human


def test_history_does_not_pass_a_cells_control_characters_to_the_terminal(crucible):
    crucible("run", "-", input="'\x1b[2J\x1b]0;owned\x07\u202e'  # clears, retitles, reorders")
    table = crucible("history").stdout
    assert "\x1b" not in table
    assert "\x07" not in table
    assert "\u202e" not in table
    assert "\\x1b[2J" in table  # shown, escaped
    assert "\\u202e" in table
