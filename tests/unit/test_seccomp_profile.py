"""The seccomp profile executor pods run (crucible_jupyter/backends/kubernetes/
seccomp-executor.json): what it refuses, and that it is what its generator writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from crucible_jupyter.backends.local.seccomp import SECCOMP_DENY_X86_64

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "crucible_jupyter" / "backends" / "kubernetes" / "seccomp-executor.json"
GENERATOR = REPO / "dev" / "cluster" / "lib" / "seccomp-profile.py"
CONTAINERD = Path(
    "/var/cache/crucible-cluster/gomodcache/github.com/containerd/containerd@v1.7.28"
    "/contrib/seccomp/seccomp_default.go"
)


def _profile() -> dict:
    return json.loads(PROFILE.read_text())


def test_an_allow_list_that_leaves_out_what_the_local_sandbox_refuses():
    profile = _profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]
    }
    assert not allowed & set(SECCOMP_DENY_X86_64), allowed & set(SECCOMP_DENY_X86_64)
    assert {"read", "write", "clone", "execve", "mmap", "futex", "pidfd_open"} <= allowed


def test_sockets_only_of_the_unix_ip_and_netlink_route_families():
    rules = [r for r in _profile()["syscalls"] if set(r["names"]) & {"socket", "socketpair"}]
    assert all(r["names"] in (["socket"], ["socketpair"]) and r["args"] for r in rules)
    socket = sorted(tuple((a["index"], a["value"], a["op"]) for a in r["args"])
                    for r in rules if r["names"] == ["socket"])  # fmt: skip
    assert socket == [
        ((0, 1, "SCMP_CMP_EQ"),),
        ((0, 2, "SCMP_CMP_EQ"),),
        ((0, 10, "SCMP_CMP_EQ"),),
        ((0, 16, "SCMP_CMP_EQ"), (2, 0, "SCMP_CMP_EQ")),
    ]


@pytest.mark.skipif(
    not CONTAINERD.exists(), reason="containerd's source is downloaded by the dev cluster's build"
)
def test_the_shipped_profile_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("seccomp_profile", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.profile(CONTAINERD.read_text()) == _profile()
