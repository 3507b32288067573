"""The chart README's table of values says what values.yaml and values.schema.json say.

`test_chart_checks.test_readme_lists_every_value` checks that each value has a row; these
tests check the row itself: no row for a value that does not exist, the default column
equal to values.yaml, the description equal to the schema's (the table is what a cluster
admin reads; a stale default there is a wrong install). Offline: no helm, no cluster.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "crucible"
ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| `(?P<default>.*)` \| (?P<what>.*) \|$")
ABSENT = "—"  # the default column of a value values.yaml does not set (e.g. `global`)


def _leaves(schema: dict, path: str = ""):
    """(dotted path, schema node) of every value a user sets: no object with properties."""
    props = schema.get("properties")
    if props is None or schema.get("type") != "object":
        if path:
            yield path, schema
        return
    for key, sub in props.items():
        yield from _leaves(sub, f"{path}.{key}" if path else key)


def _readme_rows() -> dict[str, tuple[str, str]]:
    """key -> (default column, description column) of the README's `## Values` table."""
    text = (CHART / "README.md").read_text()
    assert "\n## Values\n" in text, "helm/crucible/README.md has no '## Values' section"
    section = text.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            assert match["key"] not in rows, f"value {match['key']} has two rows in README.md"
            rows[match["key"]] = (match["default"], match["what"])
    return rows


def _default(values: dict, dotted: str) -> str:
    node: object = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return ABSENT
        node = node[key]
    return json.dumps(node)


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_readme_rows_are_the_schema_values(schema):
    """One row per value, and no row for a value the schema would refuse."""
    rows, leaves = set(_readme_rows()), {path for path, _ in _leaves(schema)}
    assert sorted(rows - leaves) == [], "README.md documents values the chart does not have"
    assert sorted(leaves - rows) == [], "README.md leaves these values undocumented"


def test_readme_defaults_are_values_yaml(schema, values):
    """The default column is values.yaml's value, as JSON (`—`: values.yaml sets none)."""
    rows = _readme_rows()
    wrong = {
        path: {"README": rows[path][0], "values.yaml": _default(values, path)}
        for path, _ in _leaves(schema)
        if path in rows and rows[path][0] != _default(values, path)
    }
    assert wrong == {}


def test_schema_defaults_are_values_yaml(schema, values):
    """A `default` the schema states (what editors show) is the one values.yaml sets."""
    wrong = {
        path: {"schema": node["default"], "values.yaml": _default(values, path)}
        for path, node in _leaves(schema)
        if "default" in node and json.dumps(node["default"]) != _default(values, path)
    }
    assert wrong == {}


def test_readme_descriptions_are_the_schema_descriptions(schema):
    """The description column says what the schema's description says (HTML-escaped)."""
    rows = _readme_rows()
    wrong = {
        path: {"README": html.unescape(rows[path][1]), "schema": node.get("description")}
        for path, node in _leaves(schema)
        if path in rows and html.unescape(rows[path][1]) != node.get("description")
    }
    assert wrong == {}
