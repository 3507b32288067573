"""The wheel a user installs with ``pip install crucible_jupyter`` (not the editable install
the other tests use) carries everything Jupyter finds outside the Python package: the
kernelspec, the server-extension switch, the built JupyterLab extension and the help hook."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(out)],
        check=True,
        timeout=240,  # within the test timeout (the lab extension is built already)
    )
    (built,) = out.glob("crucible_jupyter-*.whl")
    with zipfile.ZipFile(built) as archive:
        yield archive


def data(wheel: zipfile.ZipFile, path: str) -> bytes:
    """A file installed under the environment's prefix (``<name>.data/data/<path>``)."""
    (name,) = [n for n in wheel.namelist() if n.endswith(".data/data/" + path)]
    return wheel.read(name)


def test_kernelspec_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    spec = json.loads(data(wheel, "share/jupyter/kernels/crucible/kernel.json"))
    assert spec["display_name"] == "Python (Crucible isolated)"
    assert data(wheel, "share/jupyter/kernels/crucible/logo-64x64.png")


def test_server_extension_is_enabled_by_the_wheel(wheel: zipfile.ZipFile) -> None:
    config = json.loads(data(wheel, "etc/jupyter/jupyter_server_config.d/crucible_jupyter.json"))
    assert config["ServerApp"]["jpserver_extensions"] == {"crucible_jupyter": True}


def test_lab_extension_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    prefix = "share/jupyter/labextensions/crucible-jupyter/"
    package = json.loads(data(wheel, prefix + "package.json"))
    assert package["name"] == "crucible-jupyter"
    install = json.loads(data(wheel, prefix + "install.json"))
    assert install["packageName"] == "crucible_jupyter"  # the Python package that owns it
    remote_entry = package["jupyterlab"]["_build"]["load"]  # e.g. static/remoteEntry.<hash>.js
    assert data(wheel, prefix + remote_entry)


def test_help_hook_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    # one line, imported by site at interpreter start: it must stay a cheap import
    assert wheel.read("crucible_jupyter_help.pth").decode().count("\n") <= 1
    assert "crucible_jupyter/_server_help.py" in wheel.namelist()
