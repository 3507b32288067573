"""The notebook surfaces' own checks, before anything is submitted: ``%%crucible`` options,
empty cells, ``%crucible`` lines, IPython syntax in the crucible kernel; the runner's
display updates and ``input()``; frames of display updates."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from crucible_jupyter.dispatcher import frames
from crucible_jupyter.kernel.kernel import _cell_help, _ipython_syntax, _line_command
from crucible_jupyter.lines import QueueSummary, line_command
from crucible_jupyter.magic import CrucibleMagics
from crucible_jupyter.options import (
    CELL_HELP,
    OPTIONS_HELP,
    check_cell_body,
    final_status_line,
    outcome_text,
    parse_cell_options,
)
from tests.helpers.runner import run_cell


def test_option_values_may_be_quoted():
    request = parse_cell_options(
        """ --name "my first run" --tag a --tag 'b:c' --timeout=5 --memory 1Gi --cpu 500m"""
    ).to_request()
    assert request == {
        "name": "my first run",
        "tags": ["a", "b:c"],
        "timeout": 5.0,
        "memory": "1Gi",
        "cpu": "500m",
    }
    assert parse_cell_options("").to_request() == {}


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('--name "unterminated', "no closing quotation"),
        ("--bogus 1", "unrecognized arguments: --bogus 1"),
        ("--timeout abc", "invalid float value: 'abc'"),
        ("--priority urgent", "invalid choice: 'urgent'"),
        ("--timeout 5 --timeout 6", "--timeout: given more than once"),
        ("--name a --name b", "--name: given more than once"),
        ("--timeout", "expected one argument"),
        ("stray", "unrecognized arguments: stray"),
    ],
)
def test_option_misuse_is_one_usage_error(line, says):
    with pytest.raises(UsageError) as e:
        parse_cell_options(line)
    message = str(e.value)
    assert says in message
    assert message.startswith("%%crucible")
    if "quotation" not in says:
        assert OPTIONS_HELP in message  # says how to write it


@pytest.mark.parametrize("line", ["-h", "--help", "--timeout 5 --help"])
def test_cell_help_is_shown_and_nothing_runs(line):
    class NoDispatcher:
        def __getattr__(self, name):
            raise AssertionError("asking for help must not reach a dispatcher")

    magics = CrucibleMagics(shell=None, client=NoDispatcher())
    shown = magics.crucible_cell(line, "print(1)\n")
    assert repr(shown) == CELL_HELP
    assert OPTIONS_HELP in CELL_HELP
    assert _cell_help(f"%%crucible {line}\nprint(1)")
    assert not _cell_help("%%crucible --name x\nprint('-h')")
    assert not _cell_help("print(1)")
    assert not _cell_help('%%crucible --name "a -h b"\nprint(1)')  # inside a value
    assert not _cell_help("%%crucible --tag --help\nprint(1)")  # a value (an odd tag)


def test_an_empty_cell_is_refused():
    for body in ("", "   \n\t\n"):
        with pytest.raises(UsageError, match="has no code to run"):
            check_cell_body(body)
    check_cell_body("pass")


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("", "usage: %crucible history"),
        ("frobnicate", "unknown %crucible command 'frobnicate'"),
        ("status", "usage: %crucible status EXECUTION_ID"),
        ("status a b", "usage: %crucible status EXECUTION_ID"),
        ("queue now", "%crucible queue takes no arguments"),
        ("history -n abc", "argument -n/--limit: invalid int value: 'abc'"),
        ("history --bogus", "unrecognized arguments: --bogus"),
        ("history 'open", "no closing quotation"),
    ],
)
def test_line_misuse_is_one_usage_error_before_any_call(line, says):
    def no_client():
        raise AssertionError("misuse must be caught before the dispatcher is asked")

    with pytest.raises(UsageError) as e:
        line_command(no_client, line)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_history_help_is_shown_not_raised():
    shown = line_command(lambda: None, "history --help")
    assert "%crucible history [-n N]" in repr(shown)


def test_queue_summary_reads_as_a_sentence_and_stays_a_dict():
    summary = QueueSummary(
        {"depth": {"high": 1, "normal": 2, "low": 0}, "queued": 3, "running": 2, "capacity": 2}
    )
    assert repr(summary) == "queue: 3 queued (high 1, normal 2, low 0), 2 running of 2"
    assert summary["capacity"] == 2


def test_outcome_text_does_not_repeat_the_status():
    assert outcome_text("timed_out", "timed out after 1 s") == "timed out after 1 s"
    assert outcome_text("failed", "exited with code 3") == "failed: exited with code 3"
    assert outcome_text("cancelled", None) == "cancelled"


@pytest.mark.parametrize(
    "code",
    [
        "%magics",
        "%%time\nprint(1)",
        "!ls -l",
        "files = !ls",
        "print?",
        "x = 1\n%timeit x + 1\n",
        "%crucible history\nprint(1)",
    ],
)
def test_ipython_syntax_is_named_in_the_crucible_kernel(code):
    why = _ipython_syntax(code)
    assert why is not None
    assert "IPython syntax" in why
    assert "%crucible history" in why


@pytest.mark.parametrize(
    "code",
    [
        "print(1)",
        's = """\n%not a magic\n!nor a command\n"""',
        "x = (1,",  # a plain syntax error: the cell reports it, with its traceback
        "await something()",  # top-level await runs in the sandbox
        "a = 5 % 3",
    ],
)
def test_python_is_left_to_the_sandbox(code):
    assert _ipython_syntax(code) is None


def test_kernel_line_commands():
    assert _line_command("%crucible history -n 3") == "history -n 3"
    assert _line_command("  %crucible queue\n") == "queue"
    assert _line_command("%crucible") == ""
    assert _line_command("%crucible history\nprint(1)") is None
    assert _line_command("%%crucible --timeout 1\nprint(1)") is None
    assert _line_command("%cruciblex") is None


def test_display_updates_are_update_frames():
    line = (
        b'{"type":"update_display_data","data":{"text/plain":"2"},"transient":{"display_id":"d"}}'
    )
    assert frames.parse(line) == (
        "update_display_data",
        {"data": {"text/plain": "2"}, "metadata": {}, "transient": {"display_id": "d"}},
    )
    # without the id it replaces, an update is shown as a new output
    kind, _ = frames.parse(b'{"type":"update_display_data","data":{"text/plain":"2"}}')
    assert kind == "display_data"


def test_runner_update_display_and_publish_update(tmp_path):
    code = (
        "from IPython.display import display, update_display, publish_display_data\n"
        "h = display('first', display_id=True)\n"
        "update_display('second', display_id=h.display_id)\n"
        "publish_display_data({'text/plain': 'third'}, transient={'display_id': h.display_id},"
        " update=True)\n"
        "display('fourth', display_id=h.display_id)\n"
    )
    result = run_cell(tmp_path, code)
    shown = [f["data"]["text/plain"] for f in result.of("display_data")]
    updated = [f["data"]["text/plain"] for f in result.of("update_display_data")]
    assert shown == ["'first'", "'fourth'"]  # display() with an existing id is another output
    assert updated == ["'second'", "third"]
    ids = {f["transient"]["display_id"] for f in result.of("update_display_data")}
    assert ids == {result.of("display_data")[0]["transient"]["display_id"]}


def test_runner_input_says_there_is_no_stdin(tmp_path):
    result = run_cell(
        tmp_path,
        "try:\n    input('name? ')\nexcept EOFError as e:\n    print('caught', e)\ninput()\n",
    )
    assert result.text("stdout").startswith("name? caught input() is not available")
    [error] = result.of("error")
    assert error["ename"] == "EOFError"
    assert "without stdin" in error["evalue"]
    assert result.exit_code == 1


def test_the_final_status_line_says_how_it_ended():
    ok = {"type": "status", "status": "succeeded", "t": 3500, "reason": None}
    assert final_status_line(ok, 1000, "ID") == "crucible · ✔ succeeded in 2.50 s · ID"
    failed = {"status": "failed", "t": 1200, "reason": "ValueError: x", "dropped_bytes": 3 << 20}
    assert final_status_line(failed, 1000, "ID") == (
        "crucible · ✘ failed in 0.20 s (ValueError: x) · output truncated, 3 MiB dropped · ID"
    )
    never_ran = {"status": "cancelled", "t": 900, "reason": "cancelled by request"}
    assert final_status_line(never_ran, None, "ID") == (
        "crucible · ■ cancelled (cancelled by request) · ID"
    )
