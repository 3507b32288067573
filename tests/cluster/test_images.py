"""`dev/cluster/cluster images`: the application images (crucible service, user server, hub)
are built locally, imported into containerd, run as their non-root user with
``imagePullPolicy: Never``, and a second run finds them cached.

The first run on a cold cache builds everything (debootstrap, wheels, the labextension,
npm): minutes, hence the long timeout."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.cluster import CLUSTER_SCRIPT, pod_manifest, pod_phase, versions

pytestmark = pytest.mark.cluster

try:  # a cold build takes minutes: more than the suite's per-test limit
    import pytest_timeout  # noqa: F401

    LONG = pytest.mark.timeout(3900)
except ImportError:  # no per-test limit without the plugin (dev/cluster/ci.sh's pytest)

    def LONG(test):
        return test


IMAGES = {
    "service": versions()["SERVICE_IMAGE"],
    "singleuser": versions()["SINGLEUSER_IMAGE"],
    "hub": versions()["HUB_IMAGE"],
}
# What each image must be able to do, run as the image's own (non-root) user.
CHECKS = {
    "service": "id -u; crucible serve --help >/dev/null && echo serve-ok",
    "singleuser": "id -u; jupyterhub-singleuser --version >/dev/null && echo singleuser-ok;"
    " jupyter labextension list 2>&1 | grep -o 'crucible-jupyter.*enabled.*OK' | head -1",
    "hub": 'id -u; jupyterhub --version; python -c \'import kubespawner; print("kubespawner",'
    " kubespawner.__version__)'; configurable-http-proxy --version",
}


def _images_cmd() -> str:
    p = subprocess.run(
        [str(CLUSTER_SCRIPT), "images"], capture_output=True, text=True, timeout=3600
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def _crictl_images() -> set[str]:
    state = os.environ.get("CRUCIBLE_CLUSTER_STATE", "/var/lib/crucible-cluster")
    sock = f"unix://{state}/containerd/containerd.sock"
    crictl = (
        subprocess.run(
            [str(CLUSTER_SCRIPT), "bin-dir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        + "/crictl"
    )
    out = subprocess.run(
        [crictl, "--runtime-endpoint", sock, "--image-endpoint", sock, "images", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return {tag for img in json.loads(out)["images"] for tag in img.get("repoTags") or []}


@LONG
def test_images_command_builds_imports_and_caches(kube, namespace):
    first = _images_cmd()
    present = _crictl_images()
    assert set(IMAGES.values()) <= present, sorted(present)

    for short, image in IMAGES.items():
        pod = pod_manifest(short, image, ["sh", "-c", CHECKS[short]])
        pod["spec"]["securityContext"] = {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        pod["spec"]["containers"][0]["securityContext"] = {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }
        kube.apply(pod, namespace)
    logs = {}
    for short in IMAGES:
        kube.wait_for(
            lambda short=short: pod_phase(kube, namespace, short) in ("Succeeded", "Failed"),
            180,
            what=f"{short} checks done",
        )
        logs[short] = kube.run("logs", "-n", namespace, short).stdout
        assert pod_phase(kube, namespace, short) == "Succeeded", logs[short]
        assert logs[short].splitlines()[0] == "1000", logs[short]  # the image's own user
    assert "serve-ok" in logs["service"]
    assert "singleuser-ok" in logs["singleuser"]
    assert "crucible-jupyter" in logs["singleuser"], logs["singleuser"]
    assert versions()["JUPYTERHUB_VERSION"] in logs["hub"]
    assert f"kubespawner {versions()['KUBESPAWNER_VERSION']}" in logs["hub"]
    assert versions()["CHP_VERSION"] in logs["hub"]

    # Nothing changed: the second run only rebuilds the wheel to hash it; it installs
    # and imports nothing. (In a shared checkout someone may commit in between: then the
    # project's two images are rightly rebuilt, and only the hub's must be up to date.)
    again = _images_cmd()
    unchanged = IMAGES.values() if _head(first) == _head(again) else [IMAGES["hub"]]
    for image in unchanged:
        assert f"{image}: up to date" in again, again
    if len(unchanged) == len(IMAGES):
        assert "installing" not in again, again
        assert "importing" not in again, again


def _head(output: str) -> str:
    """The commit whose wheel a `cluster images` run built (its log says so)."""
    return output.split("building the crucible_jupyter wheel of ", 1)[1].split()[0]
