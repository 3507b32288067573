"""What a notebook user types and reads: the ``%%crucible`` option grammar, its help, and the
status texts, shared by the magic (:mod:`crucible_jupyter.magic`) and the crucible kernel
(:mod:`crucible_jupyter.kernel`), so both accept the same options and say the same things.

Promises:

- :func:`parse_cell_options` reads an options line into :class:`CellOptions`; words are split
  as a shell does (quotes group words and are removed); each option but ``--tag`` may be
  given once. Any misuse (unknown or repeated option, bad value, missing value, unbalanced
  quotes) raises one :class:`~IPython.core.error.UsageError` starting ``%%crucible:`` that
  says what is wrong and lists the options. Values are checked here only as far as their
  form (a number, a priority); the dispatcher judges the rest (limits, sizes, tag form).
- :func:`split_cell` finds a ``%%crucible`` first line (after blank lines, as IPython does).
- :data:`CELL_HELP`, :data:`OPTIONS_HELP`, :data:`OPTIONS_USAGE`, :data:`LINE_USAGE`,
  :data:`HISTORY_HELP`: the help.
- :class:`CellStatus` follows one execution's status events and gives its status line
  (:func:`live_status_line` until it ends, then :func:`final_status_line`); with
  :func:`outcome_text` and the other ``*_text``/``*_line`` functions, every line the two
  surfaces show about an execution.
"""

from __future__ import annotations

import argparse
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from IPython.core.error import UsageError

from .models import format_bytes
from .protocol import is_terminal_event

# ----- the grammar ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One ``%%crucible`` option: ``--{name} {metavar}``, the request field it sets."""

    name: str
    metavar: str
    help: str
    example: str = ""  # shown in OPTIONS_HELP after the metavar, in parentheses
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    repeatable: bool = False

    @property
    def flag(self) -> str:
        """``--name``."""
        return f"--{self.name}"

    @property
    def summary(self) -> str:
        """``--memory SIZE (256Mi, 2Gi)``: how OPTIONS_HELP shows it."""
        return f"{self.flag} {self.metavar}" + (f" ({self.example})" if self.example else "")


#: Every ``%%crucible`` option, in the order the help lists them.
OPTIONS: tuple[Option, ...] = (
    Option("timeout", "SECONDS", "Wall-clock limit in seconds.", type=float),
    Option(
        "priority",
        "high|normal|low",
        "Scheduling priority.",
        choices=("high", "normal", "low"),
    ),
    Option("cpu", "CORES", "CPU cores, e.g. 0.5 or 500m.", example="0.5 or 500m"),
    Option("memory", "SIZE", "Memory limit, e.g. 512Mi or 2Gi.", example="256Mi, 2Gi"),
    Option("image", "NAME", "Container image (Kubernetes backend)."),
    Option("backend", "NAME", "Backend name, e.g. local or kubernetes."),
    Option("tag", "TAG", "Tag the execution (repeatable).", example="repeatable", repeatable=True),
    Option("name", "NAME", "A name for the execution, shown in the history."),
)

#: The options in one line, as error messages and the help quote them.
OPTIONS_HELP = ", ".join(option.summary for option in OPTIONS)

#: What ``%%crucible --help`` (magic or kernel) shows.
CELL_HELP = (
    "%%crucible [options] on a cell's first line runs the rest of the cell as an isolated,"
    " recorded execution (a fresh process: nothing is shared with this kernel or other"
    f" cells). Options: {OPTIONS_HELP}. See also %crucible history | status ID | queue."
)

#: The usage of the ``%crucible`` line magic (and one-line cell in the kernel).
LINE_USAGE = (
    "usage: %crucible history [-n N] [--status S] [--tag T] [--user U] | status ID | queue"
    "  (and %%crucible [options] on a cell's first line to run it)"
)

#: What ``%crucible history --help`` shows.
HISTORY_HELP = (
    "%crucible history [-n N] [--status S] [--tag T] [--user U]: the newest recorded"
    " executions (N of them, 10 by default), optionally only those with status S"
    " (queued, running, succeeded, failed, timed_out, cancelled), tag T or user U"
)

#: The example the kernel's banner and its IPython-syntax notice give.
OPTIONS_EXAMPLE = "%%crucible --timeout 30 --memory 1Gi --tag x"

_CELL_MAGIC = re.compile(r"%%crucible(?=\s|$)")


@dataclass(frozen=True)
class CellOptions:
    """The options of one ``%%crucible`` cell (None: not given, the dispatcher's default)."""

    timeout: float | None = None
    priority: str | None = None
    cpu: str | None = None
    memory: str | None = None
    image: str | None = None
    backend: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = ()

    def to_request(self) -> dict[str, Any]:
        """The request fields these options set (only those given; ``tags`` for ``--tag``)."""
        request: dict[str, Any] = {
            option.name: getattr(self, option.name)
            for option in OPTIONS
            if not option.repeatable and getattr(self, option.name) is not None
        }
        if self.tags:
            request["tags"] = list(self.tags)
        return request


class _Once(argparse.Action):
    """Store an option's value; a second occurrence is an error, not a silent override."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given more than once; give it once")
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one UsageError (never an exit), with the options listed."""

    def error(self, message: str) -> Any:
        stray = message.partition("unrecognized arguments: ")[2]
        if stray and not stray.startswith("-"):  # most often a value with spaces, unquoted
            message += ' (a value with spaces needs quotes: --name "my run")'
        raise UsageError(f"%%crucible: {message}. Options: {OPTIONS_HELP}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%%crucible", add_help=False)
    for option in OPTIONS:
        if option.repeatable:
            parser.add_argument(option.flag, action="append", default=[], help=option.help)
        else:
            parser.add_argument(
                option.flag,
                action=_Once,
                type=cast("Callable[[str], Any]", option.type),  # None: argparse's own default
                choices=option.choices,
                metavar=option.metavar if option.choices is None else None,
                help=option.help,
            )
    return parser


_PARSER = _parser()
#: The usage line, then one line per option (what ``%%crucible?`` shows below the docstring).
OPTIONS_USAGE = _PARSER.format_help()


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as e:  # "No closing quotation"
        raise UsageError(
            f"%%crucible: cannot read the options {line.strip()!r}: {str(e).lower()};"
            ' quote a value with spaces as --name "my run"'
        ) from None


def parse_cell_options(line: str) -> CellOptions:
    """The options of a ``%%crucible`` line (``line``: what follows ``%%crucible``).

    Raises one ``UsageError`` naming the problem and listing the options."""
    args = _PARSER.parse_args(_words(line))
    values = {o.name: getattr(args, o.name) for o in OPTIONS if not o.repeatable}
    return CellOptions(**values, tags=tuple(args.tag))


def wants_help(line: str) -> bool:
    """Whether a ``%%crucible`` options line asks for help (``-h`` or ``--help`` as an
    option: not inside a quoted value, not as the value of an option)."""
    try:
        words = shlex.split(line)
    except ValueError:
        return False  # unbalanced quotes: parse_cell_options says so
    takes_value = {option.flag for option in OPTIONS}
    return any(
        w in ("-h", "--help") and (i == 0 or words[i - 1] not in takes_value)
        for i, w in enumerate(words)
    )


def split_cell(code: str) -> tuple[str, str] | None:
    """``(options line, body)`` of a cell whose first line (blank lines before it do not
    count, as in IPython) is ``%%crucible [options]``; None for any other cell."""
    text = code.lstrip("\r\n\t ")
    m = _CELL_MAGIC.match(text)
    if m is None:
        return None
    first, _, body = text.partition("\n")
    return first[m.end() :], body


def check_cell_body(code: str) -> None:
    """UsageError for a cell with nothing to run under its ``%%crucible`` line."""
    if not code.strip():
        raise UsageError(
            "%%crucible: the cell has no code to run; put the code on the lines after"
            " the %%crucible line"
        )


def _history_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            raise UsageError(f"%crucible history: {message}; {self.format_usage().strip()}")

    parser = Parser(
        prog="%crucible history",
        usage="%(prog)s [-n N] [--status S] [--tag T] [--user U]",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-n", "--limit", type=int, default=10)
    parser.add_argument("--status")
    parser.add_argument("--tag")
    parser.add_argument("--user")
    return parser


def parse_history(words: list[str]) -> dict[str, Any] | None:
    """The filters of ``%crucible history`` (``words``: after ``history``); None when it
    asks for help. Misuse raises one ``UsageError``."""
    opts = _history_parser().parse_args(words)
    if opts.help:
        return None
    return {k: v for k, v in vars(opts).items() if v is not None and k != "help"}


# ----- status texts ---------------------------------------------------------------------------

_ICONS = {"succeeded": "✔", "failed": "✘", "timed_out": "⏱", "cancelled": "■"}
SUBMITTING = "crucible · submitting"
NO_ANSWER = "crucible · no answer"


def refused_line(error: object) -> str:
    """The status line of a cell the dispatcher refused."""
    return f"crucible · refused · {error}"


def lost_line(execution_id: str, error: object) -> str:
    """The status line of a cell whose stream was lost (the server went away)."""
    return f"crucible · lost track of {execution_id}: {error}"


def live_status_line(
    state: str, position: int | None, running_since: float | None, execution_id: str
) -> str:
    """The status line while a cell is not finished: ``crucible · running · 3 s · ID``,
    ``crucible · queued at position 2 · ID`` or ``crucible · starting · ID``
    (``running_since``: ``time.monotonic()`` when it began to run)."""
    if state == "running" and running_since is not None:
        return f"crucible · running · {time.monotonic() - running_since:.0f} s · {execution_id}"
    if state == "queued" and position is not None:
        return f"crucible · queued at position {position} · {execution_id}"
    return f"crucible · {state} · {execution_id}"


def final_status_line(event: dict[str, Any], t_running: int | None, execution_id: str) -> str:
    """The last status line of a cell, from its terminal status event: ``crucible · ✔
    succeeded in 0.03 s · ID``, with the reason when it did not succeed and a note when output
    was dropped (``t_running``: the ``t`` of its running event, if any)."""
    state = str(event.get("status", ""))
    t_end = event.get("t")
    took = f" in {(t_end - t_running) / 1000:.2f} s" if t_running and t_end else ""
    reason = event.get("reason")
    why = f" ({reason})" if reason and state != "succeeded" else ""
    dropped = event.get("dropped_bytes")
    cut = f" · output truncated, {format_bytes(dropped)} dropped" if dropped else ""
    icon = _ICONS.get(state, "")
    return f"crucible · {icon} {state.replace('_', ' ')}{took}{why}{cut} · {execution_id}"


class CellStatus:
    """Where one cell's execution is, followed from its status events, and the status line
    that says so (:meth:`line`): what the magic and the kernel show, kept the same way."""

    def __init__(self, execution_id: str) -> None:
        self.id = execution_id
        self.state = "queued"
        self.position: int | None = None
        self.running_since: float | None = None  # time.monotonic() when it began to run
        self.t_running: int | None = None  # the ``t`` of its running event
        self.final: dict[str, Any] | None = None  # its terminal status event

    @property
    def terminal(self) -> bool:
        """True once the terminal status event was seen."""
        return self.final is not None

    @property
    def reason(self) -> str | None:
        """Why it ended as it did (the terminal event's ``reason``), if it has ended."""
        return None if self.final is None else self.final.get("reason")

    def update(self, event: dict[str, Any]) -> None:
        """Take in one status event (``{"type": "status", "status": ..., "t": ...}``)."""
        self.state = str(event.get("status", self.state))
        if event.get("position") is not None:
            self.position = event["position"]
        if self.state == "running" and self.running_since is None:
            self.running_since = time.monotonic()
            self.t_running = event.get("t")
        if is_terminal_event(event):
            self.final = event

    def line(self) -> str:
        """The status line now: live (queued, running with the elapsed time) or final."""
        if self.final is not None:
            return final_status_line(self.final, self.t_running, self.id)
        return live_status_line(self.state, self.position, self.running_since, self.id)


def outcome_text(status: str, reason: str | None) -> str:
    """``"failed: exited with code 3"``; ``"timed out after 5 s"`` (no repeated words)."""
    text = status.replace("_", " ")
    if not reason:
        return text
    return reason if reason.startswith(text) else f"{text}: {reason}"


def failure_text(summary: str, execution_id: str) -> str:
    """The message of a cell that did not succeed: ``summary (crucible execution ID)``."""
    return f"{summary} (crucible execution {execution_id})"


def traceback_trailer(execution_id: str, state: str) -> str:
    """The line after a remote traceback: which execution, how it ended."""
    return f"(crucible execution {execution_id}, {state})"


def interrupted_text(execution_id: str | None, state: str) -> str:
    """What an interrupted cell says became of its execution (``state``: ``cancelled``,
    ``being cancelled``...)."""
    if execution_id is None:
        return "interrupted before the cell was accepted; nothing runs"
    return f"crucible execution {execution_id} {state.replace('_', ' ')}"
