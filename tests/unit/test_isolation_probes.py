"""The runner's pre-cell isolation check (every address it is given, the node as the pod
sees it), its removal of the kubelet's variables, and how doctor reads its probes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from crucible_jupyter import runner
from crucible_jupyter.backends.kubernetes import probes

RUNNER = Path(runner.__file__)


def test_targets_are_a_list_of_host_port_ipv6_in_brackets():
    assert runner._parse_targets("10.0.0.1:6443,[fe80::1%eth0]:443, [fd00::2]:6443") == [
        ("10.0.0.1", 6443),
        ("fe80::1%eth0", 443),
        ("fd00::2", 6443),
    ]
    assert isinstance(runner._await_isolation("nonsense"), str)  # never "isolated"


def test_any_reachable_target_is_reported_after_the_wait():
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as srv:
        port = srv.getsockname()[1]
        spec = f"127.0.0.1:9,[::1]:{port}"
        assert runner._await_isolation(spec, limit=0.3) == f"[::1]:{port}"
    assert runner._await_isolation(spec, limit=0.3) is True  # closed: refused is not reached


def test_the_kubelets_variables_do_not_reach_the_cell(tmp_path):
    cell = tmp_path / "cell.py"
    cell.write_text(
        "import os\n"
        "print(sorted(k for k in os.environ if k.startswith('KUBERNETES')))\n"
        "print(b'10.96.0.1' in open('/proc/self/environ', 'rb').read())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "KUBERNETES_SERVICE_HOST": "10.96.0.1",
           "KUBERNETES_SERVICE_PORT": "443", "KUBERNETES_PORT": "tcp://10.96.0.1:443",
           "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1", "KUBERNETES_MINE": "kept"}  # fmt: skip
    done = subprocess.run([sys.executable, "-I", str(RUNNER), "--code-file", str(cell)],
                          capture_output=True, env=env, timeout=60)  # fmt: skip
    text = "".join(
        f.get("text", "") for f in map(json.loads, done.stdout.splitlines())
    )  # fmt: skip
    assert text == "['KUBERNETES_MINE']\nFalse\n", done.stderr


def _result(kind, result, family="ipv4", proto="tcp"):
    return {"proto": proto, "to": "10.244.0.1", "port": 1, "kind": kind,
            "family": family, "result": result}  # fmt: skip


ALL_BLOCKED = [
    _result("api", "refused"),  # where something listens, a refusal is the enforcer's
    _result("node", "unreachable (Network is unreachable)", "ipv6"),
    _result("pod", "no answer"),
    _result("pod", "unreachable (Network is unreachable)", "ipv6", "udp"),
    _result("node port", "no answer"),
    _result("node port", "no answer", proto="udp"),
]
LISTENER = {"ipv4": ["10.244.0.9"], "ipv6": [], "port": probes.PORT}


def test_doctor_says_enforced_only_when_every_family_was_probed_and_nothing_answered():
    check = probes.network_check({"ipv6_interfaces": [], "results": ALL_BLOCKED}, [], LISTENER)
    assert check.ok, check
    assert check.detail.startswith("enforced"), check
    assert "IPv6 is off" in check.detail
    only_v4 = [r for r in ALL_BLOCKED if r["family"] == "ipv4"]
    check = probes.network_check({"ipv6_interfaces": [], "results": only_v4}, [], LISTENER)
    assert not check.ok
    assert "incomplete" in check.detail
    assert not probes.network_check(None, [], LISTENER).ok


def test_a_refusal_at_a_node_port_is_an_answer():
    results = [*ALL_BLOCKED, _result("node port", "refused")]
    check = probes.network_check({"ipv6_interfaces": [], "results": results}, [], LISTENER)
    assert not check.ok, check
    assert check.detail.startswith("NOT enforced"), check


def test_any_connection_reply_or_contact_fails_the_check():
    for extra in (_result("pod", "open", "ipv6"), _result("multicast", "open (by fe80::1)")):
        results = [*ALL_BLOCKED, extra]
        check = probes.network_check({"ipv6_interfaces": ["eth0"], "results": results}, [],
                                     LISTENER)  # fmt: skip
        assert not check.ok, check
        assert check.detail.startswith("NOT enforced"), check
    check = probes.network_check({"ipv6_interfaces": [], "results": ALL_BLOCKED},
                                 ["udp from fe80::2"], LISTENER)  # fmt: skip
    assert not check.ok
    assert "listener pod was contacted" in check.detail


def test_probe_reports_are_found_in_the_frames():
    frames = "\n".join(
        json.dumps({"type": "stream", "name": "stdout", "text": text})
        for text in ("noise\n", 'NETPROBE {"results": []}\n')
    )
    assert probes.find_json(frames, "NETPROBE") == {"results": []}
    assert probes.find_json(frames, "LISTENING") is None
