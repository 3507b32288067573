"""Escape attempts against the real bubblewrap sandbox, and limits that hold."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, stream_text


@pytest.fixture
def host_tcp_server():
    """A TCP server on the host's 127.0.0.1 that counts connections."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], accepted
    stop.set()
    t.join()
    srv.close()


async def test_no_network_not_even_host_loopback(dispatcher, host_tcp_server):
    port, accepted = host_tcp_server
    # the server is reachable from the host itself
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    for _ in range(100):
        if accepted:
            break
        time.sleep(0.02)
    assert len(accepted) == 1
    code = textwrap.dedent(f"""
        import socket
        for host in ("127.0.0.1", "10.0.2.2", "8.8.8.8"):
            try:
                socket.create_connection((host, {port}), timeout=2)
                print("CONNECTED", host)
            except OSError as e:
                print("refused", host, type(e).__name__)
        import os
        print("interfaces", sorted(os.listdir("/sys/class/net")) if os.path.exists("/sys/class/net") else "none")
    """)
    before = len(accepted)
    execution, events = await run_cell(dispatcher, code)
    out = stream_text(events, "stdout")
    assert "CONNECTED" not in out, out
    assert out.count("refused") == 3
    assert len(accepted) == before


async def test_host_secrets_and_homes_are_invisible(dispatcher):
    secret = Path("/root/crucible-test-secret.txt")
    secret.write_text("top secret")
    try:
        code = textwrap.dedent(f"""
            import os
            for path in ({str(secret)!r}, "/etc/shadow", "/home"):
                try:
                    if os.path.isdir(path):
                        print("LISTED", path, os.listdir(path))
                    else:
                        print("READ", path, open(path).read()[:20])
                except OSError as e:
                    print("denied", path, type(e).__name__)
            print("root has", sorted(os.listdir("/root")) if os.path.isdir("/root") else "nothing")
            print("passwd", open("/etc/passwd").read().count(":x:"))
        """)
        execution, events = await run_cell(dispatcher, code)
        out = stream_text(events, "stdout")
        assert "top secret" not in out
        assert "READ" not in out, out
        assert "LISTED" not in out, out
        assert out.count("denied") == 3
        assert "crucible-test-secret" not in out.split("root has")[1]
        assert "passwd 1" in out  # only the sandbox user, not the host's accounts
    finally:
        secret.unlink()


async def test_cannot_write_outside_tmp(dispatcher):
    code = textwrap.dedent("""
        import os
        for path in ("/usr/evil", "/evil", "/opt/crucible/evil", os.__file__ + ".evil"):
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as e:
                print("denied", type(e).__name__)
        open("/tmp/ok", "w").write("fine")
        print("tmp ok", open("/tmp/ok").read())
    """)
    execution, events = await run_cell(dispatcher, code)
    out = stream_text(events, "stdout")
    assert "WROTE" not in out, out
    assert out.count("denied") == 4
    assert "tmp ok fine" in out


async def test_no_view_of_host_processes_and_no_privileges(dispatcher):
    host_pid = os.getpid()  # this test process, on the host
    code = textwrap.dedent(f"""
        import os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print("pids", len(pids))
        print("uid", os.getuid())
        caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
        print("capeff", caps)
        print("host pid visible", os.path.exists("/proc/{host_pid}"))
        try:
            os.kill({host_pid}, 0)
            print("SIGNALLED host")
        except OSError as e:
            print("kill denied", type(e).__name__)
    """)
    execution, events = await run_cell(dispatcher, code)
    out = stream_text(events, "stdout")
    n = int(out.split("pids ")[1].split()[0])
    assert n < 10, out  # only the sandbox's own few processes
    assert "uid 65534" in out
    assert "capeff 0000000000000000" in out
    assert "host pid visible False" in out
    assert "kill denied ProcessLookupError" in out


async def test_fork_bomb_is_contained(make_dispatcher):
    d = await make_dispatcher(local={"max_processes": 64})
    code = textwrap.dedent("""
        import os, time
        children = 0
        for _ in range(500):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
            except OSError:
                break
        print("forked", children, flush=True)
        raise SystemExit(7)
    """)
    execution, events = await run_cell(d, code, timeout=20)
    assert execution.status is Status.FAILED
    forked = int(stream_text(events, "stdout").split()[1])
    assert forked < 64
    assert "process limit reached" in execution.reason


async def test_memory_bomb_is_contained(dispatcher):
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))"
    execution, events = await run_cell(dispatcher, code, memory="128Mi", timeout=30)
    assert execution.status is Status.FAILED
    assert execution.reason.startswith("memory limit exceeded"), execution.reason


async def test_big_file_is_refused(make_dispatcher):
    d = await make_dispatcher(local={"max_file_size": 1 << 20})
    code = "open('/tmp/big', 'wb').write(b'x' * (4 << 20))"
    execution, events = await run_cell(d, code)
    assert execution.status is Status.FAILED
    assert any(e.type == "error" for e in events)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
async def test_one_gigabyte_of_output_keeps_memory_bounded(make_dispatcher):
    import asyncio

    d = await make_dispatcher(output_limit=10 << 20)
    code = textwrap.dedent("""
        import os
        chunk = b"y" * (1 << 20)
        for _ in range(1024):
            os.write(1, chunk)
        print("done")
    """)
    baseline = _rss()
    peak = baseline
    execution = await d.submit({"code": code, "timeout": 600})

    async def sample():
        nonlocal peak
        while True:
            peak = max(peak, _rss())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    final = await d.wait(execution.id)
    sampler.cancel()
    assert final.status is Status.SUCCEEDED
    assert final.truncated
    assert final.output_bytes <= 10 << 20
    assert final.dropped_bytes > 900 << 20
    assert peak - baseline < 200 << 20, f"dispatcher grew by {(peak - baseline) >> 20} MiB"
    events = await d.events(execution.id)
    notices = [
        e for e in events if e.type == "stream" and "[crucible] output limit" in e.data["text"]
    ]
    assert len(notices) == 1


async def test_after_the_output_limit_only_the_error_gets_through(make_dispatcher):
    d = await make_dispatcher(output_limit=64 << 10)
    code = textwrap.dedent("""
        print("x" * (60 << 10))
        print("y" * (8 << 10))   # crosses the limit: what fits is kept, the rest dropped
        print("late and small")  # would fit, but comes after the cut: dropped too
        raise ValueError("the end")
    """)
    execution, events = await run_cell(d, code)
    text = stream_text(events)
    shown = text.partition("\n[crucible]")[0]
    # every x and as many y as fit: the cell's output is kept up to the limit, in order
    assert shown.startswith("x" * (60 << 10) + "\n" + "y")
    assert shown.rstrip("y") == "x" * (60 << 10) + "\n"
    assert 60 << 10 < len(shown) < 64 << 10
    assert "late and small" not in text
    assert text.count("[crucible] output limit of 64 KiB reached") == 1
    assert [e.data["evalue"] for e in events if e.type == "error"] == ["the end"]
    assert execution.status is Status.FAILED
    assert execution.reason == "ValueError: the end"
    assert execution.truncated
    assert execution.dropped_bytes > (8 << 10) - shown.count("y")
    assert events[-1].data["dropped_bytes"] == execution.dropped_bytes


async def test_without_bubblewrap_runs_unisolated_and_says_so(make_dispatcher):
    d = await make_dispatcher(local={"bwrap": "/nonexistent/bwrap"})
    execution, events = await run_cell(d, "print('plain')")
    assert execution.status is Status.SUCCEEDED
    assert execution.isolation == "none"
    assert stream_text(events) == "plain\n"


async def test_refuses_unisolated_when_configured(make_dispatcher):
    d = await make_dispatcher(local={"bwrap": "/nonexistent/bwrap", "allow_unisolated": False})
    execution, _ = await run_cell(d, "print('plain')")
    assert execution.status is Status.FAILED
    assert "bubblewrap" in execution.reason
