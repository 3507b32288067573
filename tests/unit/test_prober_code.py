"""The doctor's prober cell (``probes.prober_code``) classifies what became of each attempt:
its helpers, run here against real local sockets (the full cell runs in tests/k8s)."""

from __future__ import annotations

import socket
import threading

import pytest

from crucible_jupyter.backends.kubernetes import probes

PLAN = {"api": [], "peer": {"ipv4": [], "ipv6": [], "port": 1}, "nodes": [], "node_ports": []}


@pytest.fixture(scope="module")
def prober() -> dict:
    """The prober's functions (the cell up to its plan-driven part), as a namespace."""
    code = probes.prober_code(PLAN, "/nonexistent/runner.py")
    compile(code, "<prober>", "exec")  # the whole cell is valid Python
    namespace: dict = {"socket": socket, "results": []}
    exec(code[code.index("def attempt(") : code.index("\napi = ")], namespace)
    return namespace


def test_tcp_open_then_refused(prober):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert prober["attempt"](prober["tcp"], host="127.0.0.1", port=port,
                                 kind=socket.SOCK_STREAM) == "open"  # fmt: skip
    assert prober["attempt"](prober["tcp"], host="127.0.0.1", port=port,
                             kind=socket.SOCK_STREAM) == "refused"  # fmt: skip


def test_udp_open_no_answer_refused(prober):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def answer_once() -> None:
            _, peer = server.recvfrom(512)
            server.sendto(b"pong", peer)

        thread = threading.Thread(target=answer_once)
        thread.start()
        assert prober["attempt"](prober["udp"], host="127.0.0.1", port=port) == "open"
        thread.join()
        assert prober["attempt"](prober["udp"], host="127.0.0.1", port=port) == "no answer"
    assert prober["attempt"](prober["udp"], host="127.0.0.1", port=port) == "refused"


def test_broadcast_answer_names_who_answered(prober):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def answer_once() -> None:
            _, peer = server.recvfrom(512)
            server.sendto(b"pong", peer)

        thread = threading.Thread(target=answer_once)
        thread.start()
        result = prober["attempt"](prober["udp_many"], host="127.0.0.1", port=port)
        thread.join()
    assert result == "open (answered by 127.0.0.1)"


def test_no_route_is_unreachable_and_run_records_it(prober):
    assert prober["attempt"](prober["tcp"], host="not-an-address", port=1).startswith(
        "unreachable ("
    )
    prober["run"]("tcp", "not-an-address", 1, "node", "ipv4")
    [row] = prober["results"]
    assert row["kind"] == "node"
    assert row["result"].startswith("unreachable (")
