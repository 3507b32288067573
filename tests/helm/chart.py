"""Rendering helm/crucible with the real helm, and reading what it renders.

:class:`Helm` runs ``helm lint`` and ``helm template`` (Kubernetes 1.34, the dev
cluster's version) and parses the output with a YAML loader that refuses duplicate keys
(a template that writes a label twice renders YAML that every other parser reads
silently, keeping one of the two).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "crucible"
EXAMPLES = CHART / "examples"
KUBE_VERSION = "1.34.0"
NAMESPACE = "jhub"
RELEASE = "crucible"

#: value sets that switch the chart's other branches on
VARIANTS: dict[str, dict[str, object]] = {
    "defaults": {},
    "postgresql": {
        "storage.type": "postgresql",
        "storage.postgresql.existingSecret.name": "crucible-db",
    },
    "existing-namespace": {"executions.createNamespace": False},
    "existing-token": {
        "hub.apiToken.existingSecret.name": "hub",
        "hub.apiToken.existingSecret.key": "hub.services.crucible.apiToken",
    },
    "no-policy-no-quota": {
        "networkPolicy.enabled": False,
        "executions.resourceQuota.enabled": False,
        "executions.limitRange.enabled": False,
    },
    "proxy-allowed": {"networkPolicy.allowProxy": True, "executions.isolationProbe": "off"},
    "sqlite-existing-claim": {"storage.sqlite.existingClaim": "old-claim", "fullnameOverride": "x"},
}


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping holding the same key twice."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_all(text: str) -> list[dict]:
    """Every non-empty YAML document in ``text`` (duplicate keys refused)."""
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d]


class HelmFailed(Exception):
    """helm exited non-zero; the message is its output."""


class Helm:
    """The helm binary, bound to the chart."""

    def __init__(self, path: str) -> None:
        self.path = path

    def run(self, *args: str) -> str:
        """``helm ARGS``; stdout, or HelmFailed with stdout and stderr."""
        done = subprocess.run(
            [self.path, *args], capture_output=True, text=True, timeout=120, cwd=REPO
        )
        if done.returncode:
            raise HelmFailed(f"helm {' '.join(args)}:\n{done.stdout}{done.stderr}")
        return done.stdout

    @staticmethod
    def _value_args(files: list[Path] | None, values: dict[str, str] | None) -> list[str]:
        args = []
        for f in files or []:
            args += ["-f", str(f)]
        for key, value in (values or {}).items():  # JSON: --set reads 0.5 as a string
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        return args

    def lint(self, files: list[Path] | None = None, values: dict | None = None) -> str:
        """``helm lint --strict`` (HelmFailed on any warning or error)."""
        return self.run(
            "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART),
            *self._value_args(files, values),
        )  # fmt: skip

    def template(self, files: list[Path] | None = None, values: dict | None = None) -> str:
        """``helm template`` of release ``crucible`` in namespace ``jhub``: the YAML."""
        return self.run(
            "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            "--kube-version", KUBE_VERSION, *self._value_args(files, values),
        )  # fmt: skip

    def render(self, files: list[Path] | None = None, values: dict | None = None) -> Rendered:
        """The rendered objects."""
        return Rendered(load_all(self.template(files, values)))


class Rendered:
    """The objects of one rendering."""

    def __init__(self, objects: list[dict]) -> None:
        self.objects = objects

    def kinds(self) -> list[str]:
        """Every object's kind."""
        return [o["kind"] for o in self.objects]

    def all(self, kind: str) -> list[dict]:
        """Every object of ``kind``."""
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        """The one object of ``kind`` whose name ends with ``name_suffix``."""
        found = [o for o in self.all(kind) if o["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"{len(found)} {kind} named *{name_suffix}: {found}"
        return found[0]

    def config(self) -> dict:
        """The service's traitlets settings (crucible_config.json in its ConfigMap)."""
        return json.loads(self.one("ConfigMap")["data"]["crucible_config.json"])


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects
    ``labels``. An empty selector selects everything, as in Kubernetes."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
