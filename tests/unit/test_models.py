"""Request validation: every refusal is typed and says what was wrong and how to fix it."""

from __future__ import annotations

import pytest

from crucible_jupyter.errors import (
    InvalidRequest,
    RequestTooLarge,
    UnsupportedLanguage,
    http_status,
)
from crucible_jupyter.models import ExecutionRequest, Limits, Priority, new_execution_id


def test_defaults():
    r = ExecutionRequest.from_dict({"code": "print(1)"})
    assert (r.language, r.timeout, r.priority) == ("python", 60.0, Priority.NORMAL)
    assert r.resources.memory == 512 << 20


@pytest.mark.parametrize(
    ("data", "error", "words"),
    [
        ([], InvalidRequest, "JSON object"),
        ({}, InvalidRequest, "'code' is required"),
        ({"code": 5}, InvalidRequest, "must be a string"),
        ({"code": "a\x00b"}, InvalidRequest, "NUL byte"),
        ({"code": "x" * (2 << 20)}, RequestTooLarge, "over the limit of 1 MiB"),
        ({"code": "1", "language": "ruby"}, UnsupportedLanguage, "supported: python"),
        ({"code": "1", "timeout": 0}, InvalidRequest, "greater than 0"),
        ({"code": "1", "timeout": -1}, InvalidRequest, "greater than 0"),
        ({"code": "1", "timeout": "soon"}, InvalidRequest, "number of seconds"),
        ({"code": "1", "timeout": 10_000}, InvalidRequest, "over the maximum of 3600"),
        ({"code": "1", "timeout": float("nan")}, InvalidRequest, "greater than 0"),
        ({"code": "1", "timeout": True}, InvalidRequest, "number of seconds"),
        ({"code": "1", "priority": "urgent"}, InvalidRequest, "high, normal, low"),
        ({"code": "1", "memory": "lots"}, InvalidRequest, "512Mi"),
        ({"code": "1", "memory": "1Pi"}, InvalidRequest, "unknown unit"),
        ({"code": "1", "memory": "100Gi"}, InvalidRequest, "over the maximum"),
        ({"code": "1", "memory": "1Mi"}, InvalidRequest, "under the minimum"),
        ({"code": "1", "cpu": "-1"}, InvalidRequest, "greater than zero"),
        ({"code": "1", "cpu": 64}, InvalidRequest, "over the maximum"),
        ({"code": "1", "cpu": 1e-9}, InvalidRequest, "under the minimum of 0.001"),
        ({"code": "1", "cpu": "0.5m"}, InvalidRequest, "under the minimum"),
        ({"code": "1", "env": {"1BAD": "x"}}, InvalidRequest, "is invalid"),
        ({"code": "1", "env": {"LD_PRELOAD": "x"}}, InvalidRequest, "reserved"),
        ({"code": "1", "env": {"A": 1}}, InvalidRequest, "must be a string"),
        ({"code": "1", "env": {"A": "x" * 70000}}, RequestTooLarge, "environment is"),
        ({"code": "1", "tags": ["has space"]}, InvalidRequest, "tag 'has space' is invalid"),
        ({"code": "1", "tags": 7}, InvalidRequest, "list of strings"),
        ({"code": "1", "notebook": {"path": 3}}, InvalidRequest, "notebook.path"),
        ({"code": "1", "colour": "red"}, InvalidRequest, "unknown field(s) 'colour'"),
    ],
)
def test_refusals_are_typed_and_explain(data, error, words):
    with pytest.raises(error) as info:
        ExecutionRequest.from_dict(data)
    assert words in info.value.message
    assert 400 <= http_status(info.value) < 500


def test_sizes_and_cpu_units():
    r = ExecutionRequest.from_dict({"code": "1", "memory": "256Mi", "cpu": "500m"})
    assert (r.resources.memory, r.resources.cpu) == (256 << 20, 0.5)
    r = ExecutionRequest.from_dict({"code": "1", "resources": {"memory": 1 << 30, "cpu": 2}})
    assert (r.resources.memory, r.resources.cpu) == (1 << 30, 2.0)


@pytest.mark.parametrize("field", ["cpu", "timeout"])
@pytest.mark.parametrize("text", ["1_000", "\u0661", "\uff12", "inf", "nan", "0x10", "1,5"])
def test_numbers_in_strings_are_plain_decimal(field, text):
    # float() takes all of these; the OpenAPI document (and a reader) expect plain decimals
    with pytest.raises(InvalidRequest, match=f"{field} must be a number") as info:
        ExecutionRequest.from_dict({"code": "1", field: text})
    assert info.value.field == field
    assert ExecutionRequest.from_dict({"code": "1", field: " 1.5 "}).to_dict()  # spaces pass


def test_limits_are_configurable():
    limits = Limits(max_code_bytes=10, max_timeout=5, images=("a",))
    with pytest.raises(RequestTooLarge):
        ExecutionRequest.from_dict({"code": "x" * 11}, limits)
    with pytest.raises(InvalidRequest, match="over the maximum of 5"):
        ExecutionRequest.from_dict({"code": "1", "timeout": 6}, limits)
    assert ExecutionRequest.from_dict({"code": "1"}, limits).timeout == 5
    with pytest.raises(InvalidRequest, match="allowed images: a"):
        ExecutionRequest.from_dict({"code": "1", "image": "b"}, limits)


def test_round_trip_and_unicode():
    data = {
        "code": "print('שלום 🎉')",
        "tags": ["a", "a", "b"],
        "env": {"X": "é"},
        "notebook": {"path": "n.ipynb", "cell_id": "c1"},
        "priority": "high",
    }
    r = ExecutionRequest.from_dict(data)
    assert r.tags == ("a", "b")
    assert ExecutionRequest.from_dict(r.to_dict()) == r


def test_ids_sort_by_time():
    ids = [new_execution_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) == 36 and i[14] == "7" for i in ids)
