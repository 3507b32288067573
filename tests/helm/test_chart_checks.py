"""The chart's checks that need no cluster: lint, Kubernetes 1.34 schemas, values schema.

Every rendering (the defaults, each example values file, and the variants below) must pass
``helm lint --strict`` and validate against the Kubernetes 1.34 OpenAPI schemas bundled
by kubernetes-validate (strict: unknown fields are errors). Bad values files
(tests/helm/bad-values/) must be refused with the message their first line names.
"""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest

from .chart import CHART, EXAMPLES, KUBE_VERSION, VARIANTS, HelmFailed

pytestmark = pytest.mark.helm

BAD_VALUES = Path(__file__).parent / "bad-values"
#: the examples for this chart (z2jh-values.yaml is for the jupyterhub chart)
EXAMPLE_FILES = sorted(p for p in EXAMPLES.glob("*-values.yaml") if p.name != "z2jh-values.yaml")


def test_examples_exist():
    names = {p.name for p in EXAMPLE_FILES}
    assert {"dev-cluster-values.yaml", "production-values.yaml"} <= names
    assert (EXAMPLES / "z2jh-values.yaml").exists()


@pytest.mark.parametrize(
    "values_file", [None, *EXAMPLE_FILES], ids=lambda p: p.name if p else "defaults"
)
def test_lint_strict(helm, values_file):
    helm.lint([values_file] if values_file else None)


def _validate(objects: list[dict]) -> list[str]:
    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            version = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.utils.ValidationError as e:
            problems.append(f"{name}: {e.message} at {'.'.join(map(str, e.path))}")
            continue
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            problems.append(f"{name}: no schema: {e}")
            continue
        assert version == "1.34", f"validated against {version}, not 1.34"
    return problems


@pytest.mark.parametrize("values_file", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_renderings_valid_for_kubernetes_1_34(helm, values_file):
    rendered = helm.render([values_file])
    assert len(rendered.objects) >= 10
    assert _validate(rendered.objects) == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_renderings_valid_for_kubernetes_1_34(helm, variant):
    rendered = helm.render(values=VARIANTS[variant])
    assert _validate(rendered.objects) == []


def test_schema_validation_catches_a_bad_object():
    """The validation above can fail: a misspelt field in a rendered object is refused."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"selectr": {"a": "b"}}}  # fmt: skip
    errors = _validate([bad])
    assert errors
    assert "selectr" in errors[0]


def _bad_files() -> list[Path]:
    return sorted(BAD_VALUES.glob("*.yaml"))


@pytest.mark.parametrize("bad", _bad_files(), ids=lambda p: p.stem)
def test_bad_values_refused(helm, bad):
    """``# refused: MSG``: the schema refuses it (lint, template, install say MSG).
    ``# refused by the templates: MSG``: a rule between two values, which JSON Schema
    cannot state: the templates ``fail`` with MSG (template, install); helm lint reports
    a template's ``fail`` as INFO and passes, by design."""
    first = bad.read_text().splitlines()[0]
    by_templates = first.startswith("# refused by the templates: ")
    assert by_templates or first.startswith("# refused: "), f"{bad.name}: say what refuses it"
    expected = first.split(": ", 1)[1]
    with pytest.raises(HelmFailed) as template:
        helm.template([bad])
    assert expected in str(template.value), str(template.value)
    if by_templates:
        helm.lint([bad])
    else:
        with pytest.raises(HelmFailed) as lint:
            helm.lint([bad])
        assert expected in str(lint.value), str(lint.value)


def test_enough_bad_values_files():
    assert len(_bad_files()) >= 10


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")


def test_schema_documents_every_value_and_refuses_unknown_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())
    undocumented, open_objects = [], []
    for path, node in _walk(schema):
        if not str(node.get("description", "")).strip():
            undocumented.append(path or "(root)")
        closed = node.get("additionalProperties") is False
        if node.get("type") == "object" and "properties" in node and not closed:
            open_objects.append(path or "(root)")
    assert undocumented == []
    assert open_objects == []


def test_every_value_is_in_the_schema():
    """values.yaml holds no key the schema does not describe (and helm would refuse)."""
    import yaml

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def missing(vals: dict, node: dict, path: str) -> list[str]:
        out = []
        props = node.get("properties")
        if props is None:
            return out
        for key, value in vals.items():
            if key not in props:
                out.append(f"{path}.{key}")
            elif isinstance(value, dict):
                out += missing(value, props[key], f"{path}.{key}")
        return out

    assert missing(values, schema, "") == []


def test_readme_lists_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    leaves = [
        path.lstrip(".")
        for path, node in _walk(schema)
        if path and not (node.get("type") == "object" and "properties" in node)
    ]
    assert [p for p in leaves if f"| `{p}` |" not in readme] == []
