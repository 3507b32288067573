"""The ``%%crucible`` option grammar, help and status texts (:mod:`crucible_jupyter.options`),
one module for the magic and the crucible kernel: good and bad option lines as tables."""

from __future__ import annotations

import re

import pytest
from IPython.core.error import UsageError

from crucible_jupyter import magic, options
from crucible_jupyter.kernel import kernel
from crucible_jupyter.options import (
    CELL_HELP,
    OPTIONS,
    OPTIONS_HELP,
    CellOptions,
    parse_cell_options,
    split_cell,
    wants_help,
)


@pytest.mark.parametrize(
    ("line", "request_fields"),
    [
        ("", {}),
        ("   ", {}),
        ("--timeout 5", {"timeout": 5.0}),
        ("--timeout=2.5", {"timeout": 2.5}),
        ("--time 5", {"timeout": 5.0}),  # argparse's unambiguous prefixes, as before
        ("--priority high", {"priority": "high"}),
        ("--priority=low", {"priority": "low"}),
        ("--cpu 500m --memory 1Gi", {"cpu": "500m", "memory": "1Gi"}),
        ("--image python:3.12-slim", {"image": "python:3.12-slim"}),
        ("--backend kubernetes", {"backend": "kubernetes"}),
        ("--tag a --tag b:c", {"tags": ["a", "b:c"]}),
        ("--name 'my run'", {"name": "my run"}),
        ('--name "it\'s"', {"name": "it's"}),
        ("--name=-x", {"name": "-x"}),  # a value starting with - needs the = form
        ('--name ""', {"name": ""}),  # empty: the dispatcher judges it
        ("--timeout -1", {"timeout": -1.0}),  # the form is a number; the dispatcher refuses
        ("--memory lots", {"memory": "lots"}),  # likewise
    ],
)
def test_good_option_lines(line, request_fields):
    assert parse_cell_options(line).to_request() == request_fields


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('--name "unterminated', "no closing quotation"),
        ("--name 'unterminated", "no closing quotation"),
        ("--bogus 1", "unrecognized arguments: --bogus 1"),
        ("-t 5", "unrecognized arguments: -t 5"),
        ("stray", "unrecognized arguments: stray (a value with spaces needs quotes"),
        ("--name my run", "unrecognized arguments: run (a value with spaces needs quotes"),
        ("--timeout abc", "argument --timeout: invalid float value: 'abc'"),
        ("--timeout=", "argument --timeout: invalid float value: ''"),
        ("--priority urgent", "argument --priority: invalid choice: 'urgent'"),
        ("--priority HIGH", "invalid choice: 'HIGH'"),
        ("--timeout 5 --timeout 6", "argument --timeout: given more than once; give it once"),
        ("--name a --name b", "argument --name: given more than once"),
        ("--backend a --backend=b", "argument --backend: given more than once"),
        ("--timeout", "argument --timeout: expected one argument"),
        ("--tag", "argument --tag: expected one argument"),
        ("--name -x", "argument --name: expected one argument"),
    ],
)
def test_bad_option_lines_are_one_usage_error(line, says):
    with pytest.raises(UsageError) as e:
        parse_cell_options(line)
    message = str(e.value)
    assert says in message
    assert message.startswith("%%crucible: ")
    assert "\n" not in message
    if "quotation" in says:
        assert 'quote a value with spaces as --name "my run"' in message
    else:
        assert message.endswith(f"Options: {OPTIONS_HELP}")  # says how to write it


def test_cell_options_is_the_dataclass_the_request_comes_from():
    parsed = parse_cell_options("--tag x --timeout 3 --tag y")
    assert parsed == CellOptions(timeout=3.0, tags=("x", "y"))
    assert parsed.to_request() == {"timeout": 3.0, "tags": ["x", "y"]}
    # every option is a field, in the help, and in the request when given
    fields = set(CellOptions.__dataclass_fields__)
    assert {o.name for o in OPTIONS} - {"tag"} | {"tags"} == fields
    for option in OPTIONS:
        assert option.flag in OPTIONS_HELP
        assert option.flag in options.OPTIONS_USAGE


@pytest.mark.parametrize(
    ("line", "wants"),
    [
        ("-h", True),
        ("--help", True),
        ("--timeout 5 --help", True),
        ("--timeout 5", False),
        ('--name "a -h b"', False),  # inside a value
        ("--tag --help", False),  # the value of an option
        ("--name -h", False),
        ('--name "open', False),  # unreadable: parse_cell_options says so
    ],
)
def test_wants_help(line, wants):
    assert wants_help(line) is wants


@pytest.mark.parametrize(
    ("code", "split"),
    [
        ("%%crucible --timeout 5\nprint(1)\n", (" --timeout 5", "print(1)\n")),
        ("%%crucible\nprint(1)", ("", "print(1)")),
        ("%%crucible", ("", "")),
        ("\n\n%%crucible --tag x\nx = 1", (" --tag x", "x = 1")),  # blank lines first
        ("%%crucible\t-h\n", ("\t-h", "")),
        ("print(1)", None),
        ("%%cruciblex\nprint(1)", None),
        ("%%time\nprint(1)", None),
        ("x = 1\n%%crucible\n", None),  # not the first line
    ],
)
def test_split_cell(code, split):
    assert split_cell(code) == split


def test_magic_and_kernel_use_the_one_grammar_and_help():
    assert magic.parse_cell_options is kernel.parse_cell_options is parse_cell_options
    assert magic.CELL_HELP is kernel.CELL_HELP is CELL_HELP
    assert OPTIONS_HELP in CELL_HELP
    assert options.OPTIONS_EXAMPLE in kernel.BANNER
    assert options.OPTIONS_USAGE in magic.CrucibleMagics.crucible_cell.__doc__
    assert parse_cell_options(options.OPTIONS_EXAMPLE.removeprefix("%%crucible")).to_request()


def test_status_texts():
    assert options.live_status_line("queued", None, None, "ID") == "crucible · queued · ID"
    assert options.live_status_line("queued", 2, None, "ID") == (
        "crucible · queued at position 2 · ID"
    )
    assert options.live_status_line("starting", None, None, "ID") == "crucible · starting · ID"
    assert options.refused_line("no such backend") == "crucible · refused · no such backend"
    assert options.failure_text("timed out after 1 s", "ID") == (
        "timed out after 1 s (crucible execution ID)"
    )
    assert options.traceback_trailer("ID", "failed") == "(crucible execution ID, failed)"
    assert (
        options.interrupted_text("ID", "being_cancelled") == "crucible execution ID being cancelled"
    )
    assert options.interrupted_text(None, "cancelled") == (
        "interrupted before the cell was accepted; nothing runs"
    )


@pytest.mark.parametrize(
    ("words", "filters"),
    [
        ([], {"limit": 10}),
        (["-n", "3", "--status", "failed"], {"limit": 3, "status": "failed"}),
        (["--tag", "x", "--user", "ana"], {"limit": 10, "tag": "x", "user": "ana"}),
        (["--help"], None),
    ],
)
def test_history_filters(words, filters):
    assert options.parse_history(words) == filters


@pytest.mark.parametrize(
    ("words", "says"),
    [
        (["-n", "abc"], "argument -n/--limit: invalid int value: 'abc'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--status"], "argument --status: expected one argument"),
    ],
)
def test_history_misuse(words, says):
    with pytest.raises(UsageError) as e:
        options.parse_history(words)
    assert says in str(e.value)
    assert str(e.value).startswith("%crucible history: ")


@pytest.mark.parametrize(
    ("session", "cell_id", "ref"),
    [
        (None, None, {}),
        ("", "", {}),
        ("work/a.ipynb", "c1", {"path": "work/a.ipynb", "cell_id": "c1"}),
        (None, 42, {}),  # a cell id from the frontend that is not text is left out
        ("b.ipynb", None, {"path": "b.ipynb"}),
    ],
)
def test_magic_and_kernel_record_where_a_cell_comes_from_alike(monkeypatch, session, cell_id, ref):
    from crucible_jupyter.client import notebook_ref

    if session is None:
        monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    else:
        monkeypatch.setenv("JPY_SESSION_NAME", session)
    assert notebook_ref(cell_id) == ref  # no kernel app in this process: no kernel id
    assert magic.CrucibleMagics(shell=None).notebook_ref() == notebook_ref()


def _status(status: str, t: int, **fields: object) -> dict:
    return {"type": "status", "status": status, "t": t, **fields}


def test_cell_status_follows_the_events_to_the_final_line():
    cell = options.CellStatus("ID")
    assert cell.line() == "crucible · queued · ID"
    cell.update(_status("queued", 10, position=3))
    assert cell.line() == "crucible · queued at position 3 · ID"
    cell.update(_status("starting", 20))
    assert cell.line() == "crucible · starting · ID"
    cell.update(_status("running", 1000))
    assert re.fullmatch(r"crucible · running · \d+ s · ID", cell.line())
    assert not cell.terminal
    assert cell.reason is None
    cell.update(_status("failed", 1250, reason="exited with code 3"))
    assert cell.terminal
    assert cell.reason == "exited with code 3"
    assert cell.line() == "crucible · ✘ failed in 0.25 s (exited with code 3) · ID"


def test_a_cell_that_never_ran_shows_no_duration():
    """The magic used to time a cell that never ran from its own terminal event ("cancelled
    in 0.00 s"); the kernel did not. One tracker now: no duration for either."""
    cell = options.CellStatus("ID")
    cell.update(_status("cancelled", 900, reason="cancelled by request"))
    assert cell.line() == "crucible · ■ cancelled (cancelled by request) · ID"


@pytest.mark.parametrize(
    ("events", "last"),
    [
        (
            [_status("queued", 1, position=2), _status("running", 100), _status("succeeded", 2600)],
            "crucible · ✔ succeeded in 2.50 s · ID",
        ),
        (
            [_status("queued", 1), _status("cancelled", 50, reason="cancelled by request")],
            "crucible · ■ cancelled (cancelled by request) · ID",
        ),
    ],
)
def test_magic_and_kernel_show_the_same_status_lines(events, last):
    class Recorder:
        def __init__(self) -> None:
            self.shown: list[str] = []

        def show(self, text: str, *, force: bool = False) -> None:
            if not self.shown or text != self.shown[-1]:  # as StatusLine, a change only
                self.shown.append(text)

        def send_response(self, socket: object, kind: str, content: dict) -> None:
            self.shown.append(content["data"]["text/plain"])

    magic_side = Recorder()
    relay = magic._Relay("ID", magic_side, client=None)
    kernel_side = Recorder()
    kernel_side.iopub_socket = None
    status = kernel._KernelStatus(kernel_side, "ID", enabled=True)
    for event in events:
        relay.handle(event)
        status.update(event)

    def seconds_out(lines: list[str]) -> list[str]:  # the elapsed time is the clock's
        return [re.sub(r"running · \d+ s", "running · N s", line) for line in lines]

    assert seconds_out(magic_side.shown) == seconds_out(kernel_side.shown)
    assert magic_side.shown[-1] == last
