"""`down` leaves nothing behind and `up` works again.

Marked ``cluster_restart``: the root conftest runs it after every other test of the session
and skips it unless CRUCIBLE_CLUSTER_ALLOW_RESTART=1 (tests.helpers.cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cluster import CLUSTER_SCRIPT

pytestmark = [pytest.mark.cluster, pytest.mark.cluster_restart]


def _state_dir() -> str:
    return os.environ.get("CRUCIBLE_CLUSTER_STATE", "/var/lib/crucible-cluster")


def _leftovers(state: str, bridge: str = "cni0") -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state + "/" in cmd and "pytest" not in cmd:
            found.append(f"process {d.name}: {cmd[:200]}")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mp = line.split()[1]
        if mp.startswith(state + "/"):
            found.append(f"mount {mp}")
    if subprocess.run(["ip", "link", "show", bridge], capture_output=True).returncode == 0:
        found.append(f"network device {bridge}")
    # kube-proxy's Service rules, kube-router's and the kubelet's chains, ours (raw, ip6)
    for ipt in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            out = subprocess.run([ipt, "-t", table, "-S"], capture_output=True, text=True).stdout
            found += [
                f"{ipt} -t {table} chain {line.split()[1]}"
                for line in out.splitlines()
                if line.startswith(("-N KUBE-", "-N CRUCIBLE-DEV-"))
            ]
    return found


def test_down_then_up_again(kube, images):
    state = _state_dir()
    t0 = time.monotonic()
    subprocess.run([str(CLUSTER_SCRIPT), "down"], check=True, timeout=300)
    print(f"down took {int((time.monotonic() - t0) * 1000)} ms")
    assert _leftovers(state) == []
    assert subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode != 0

    t0 = time.monotonic()
    subprocess.run([str(CLUSTER_SCRIPT), "up"], check=True, timeout=600)
    up_ms = int((time.monotonic() - t0) * 1000)
    print(f"warm up took {up_ms} ms")
    assert up_ms < 120_000, "a cached `up` should take well under two minutes"

    out = kube.run("get", "nodes", "-o", "json").stdout
    node = json.loads(out)["items"][0]
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    # A pod runs after the restart.
    ns = "t-restart"
    kube.run("create", "namespace", ns, check=False)
    kube.wait_for(
        lambda: kube.run("get", "sa", "default", "-n", ns, check=False).returncode == 0, 60
    )
    kube.run(
        "run",
        "again",
        "-n",
        ns,
        "--image",
        images["executor"],
        "--image-pull-policy=Never",
        "--restart=Never",
        "--",
        "python3",
        "-c",
        "print('up again')",
    )
    kube.wait_for(
        lambda: kube.get_json("pod", "again", "-n", ns)["status"].get("phase") == "Succeeded",
        120,
        what="pod after restart",
    )
    assert "up again" in kube.run("logs", "-n", ns, "again").stdout
    kube.run("delete", "namespace", ns, "--wait=false", check=False)
