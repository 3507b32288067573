"""The names crucible's parts agree on (:mod:`crucible_jupyter.protocol`): defined once, and
the copies that cannot import them (the runner, the Lab extension) held equal to them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crucible_jupyter import protocol, runner
from crucible_jupyter.models import TERMINAL, Status
from crucible_jupyter.output_policy import ENV_TRUSTED_TYPES, clean_output
from crucible_jupyter.storage import clean_text

API_TS = Path(__file__).resolve().parents[2] / "labextension" / "src" / "api.ts"

BROKEN_TEXT = [
    ("plain", "plain"),
    ("", ""),
    ("é € 😀 \x00 \r\n", "é € 😀 \x00 \r\n"),  # valid: unchanged, NUL included
    ("a\ud800b", "a\\ud800b"),  # a lone high surrogate
    ("\udc80", "\\udc80"),  # what surrogateescape leaves of byte 0x80
    ("\ud83d\ude00", "\\ud83d\\ude00"),  # a pair as two code points is still not UTF-8
    ("ok 😀 \udfff", "ok 😀 \\udfff"),
]


@pytest.mark.parametrize(("text", "cleaned"), BROKEN_TEXT)
def test_clean_utf8_spells_lone_surrogates_out(text, cleaned):
    out = protocol.clean_utf8(text)
    assert out == cleaned
    out.encode("utf-8")  # always valid
    assert protocol.is_utf8(text) == (text == cleaned)
    if text == cleaned:
        assert out is text  # valid text is not copied


@pytest.mark.parametrize(("text", "cleaned"), BROKEN_TEXT)
def test_the_runner_cleans_text_as_the_package_does(text, cleaned):
    """runner.py runs in sandboxes without the package, so it keeps its own cleaner."""
    assert runner._clean_text(text) == protocol.clean_utf8(text) == cleaned


@pytest.mark.parametrize(("text", "cleaned"), BROKEN_TEXT)
def test_every_user_of_the_cleaner_agrees(text, cleaned):
    assert clean_text(text) == cleaned.replace("\x00", "\\x00")  # storage also escapes NUL
    shown = clean_output("display_data", {"data": {"text/plain": text}})
    assert shown["data"]["text/plain"] == cleaned


def test_statuses_are_the_models_enum_and_terminal_set():
    assert tuple(s.value for s in Status) == protocol.STATUSES
    assert {s.value for s in TERMINAL} == protocol.TERMINAL_STATUSES
    assert set(protocol.STATUSES) > protocol.TERMINAL_STATUSES
    assert all(Status(s).terminal == (s in protocol.TERMINAL_STATUSES) for s in protocol.STATUSES)


def _ts_strings(source: str, declaration: str) -> list[str]:
    """The string literals of one TypeScript declaration (``declaration`` up to its ``;``)."""
    m = re.search(re.escape(declaration) + r"(.*?);", source, re.S)
    assert m, f"{declaration!r} not found in {API_TS}; keep it (this test reads it)"
    return re.findall(r"'([^']*)'|\"([^\"]*)\"", m.group(1))


def test_the_lab_extension_knows_the_same_statuses():
    """TypeScript cannot import Python: api.ts spells the states out; this keeps it equal."""
    source = API_TS.read_text()
    union = [a or b for a, b in _ts_strings(source, "export type Status =")]
    terminal = [a or b for a, b in _ts_strings(source, "export const TERMINAL")]
    assert tuple(union) == protocol.STATUSES
    assert set(terminal) == protocol.TERMINAL_STATUSES
    assert len(terminal) == 4


def test_the_token_header_and_env_names_have_one_spelling():
    from crucible_jupyter import client
    from crucible_jupyter.server import app, base

    assert base.KERNEL_TOKEN_HEADER is client.KERNEL_TOKEN_HEADER is protocol.KERNEL_TOKEN_HEADER
    assert (app.ENV_SERVER_URL, app.ENV_TOKEN) == (protocol.ENV_SERVER_URL, protocol.ENV_TOKEN)
    assert ENV_TRUSTED_TYPES == protocol.ENV_TRUSTED_OUTPUT_TYPES
    names = [v for k, v in vars(protocol).items() if k.startswith("ENV_")]
    assert len(names) == len(set(names))
    assert all(n.startswith(protocol.RESERVED_ENV_PREFIXES[0]) for n in names)


@pytest.mark.parametrize(
    ("tag", "ok"),
    [
        ("a", True),
        ("exp:1/run@2+x=y_z.-", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("a b", False),
        ("é", False),
        ("a\n", False),  # Python's $ matches before a final newline: is_tag must not
        ("\na", False),
        (None, False),
        (5, False),
    ],
)
def test_one_tag_pattern(tag, ok):
    assert protocol.is_tag(tag) == ok


def test_the_api_document_states_the_same_tag_pattern():
    from crucible_jupyter.server.openapi import _TAG

    assert _TAG == protocol.TAG_PATTERN


def test_a_tag_with_a_newline_is_refused():
    """It was accepted while the check used re.match with ``$`` (found moving the pattern)."""
    from crucible_jupyter.errors import InvalidRequest
    from crucible_jupyter.models import ExecutionRequest

    with pytest.raises(InvalidRequest, match="tag"):
        ExecutionRequest.from_dict({"code": "1", "tags": ["a\n"]})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 25.0),
        ("", 25.0),
        ("  ", 25.0),
        ("10", 10.0),
        (" 2.5 ", 2.5),
        ("0", 0.0),
    ],
)
def test_env_float(value, expected):
    env = {} if value is None else {"X_SECONDS": value}
    assert protocol.env_float("X_SECONDS", 25, env) == expected


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", "1e999", "5s"])
def test_env_float_names_the_variable_it_cannot_read(value):
    with pytest.raises(ValueError, match=r"X_SECONDS=.* is not a number; set it to a number"):
        protocol.env_float("X_SECONDS", 25, {"X_SECONDS": value})


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        (None, True, True),
        ("", True, True),
        ("", False, False),
        ("1", False, True),
        ("yes", False, True),
        ("0", True, False),
        ("false", True, False),
        ("No", True, False),
        (" off ", True, False),
    ],
)
def test_env_flag(value, default, expected):
    env = {} if value is None else {"X_FLAG": value}
    assert protocol.env_flag("X_FLAG", default, env) is expected


def test_env_text_default_for_unset_and_empty():
    assert protocol.env_text("X", "d", {}) == "d"
    assert protocol.env_text("X", "d", {"X": ""}) == "d"
    assert protocol.env_text("X", "d", {"X": "v"}) == "v"
    # where empty means "none" (the service's admin scope), it is kept
    assert protocol.env_text("X", "d", {"X": ""}, empty_is_unset=False) == ""
    assert protocol.env_text("X", "d", {}, empty_is_unset=False) == "d"
