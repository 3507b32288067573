"""A stream WebSocket client that never reads, while its cell floods (issue 12, item 6): the
execution still times out, the server keeps answering, and the client is let go."""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from crucible_jupyter.server.stream import _CrucibleSocket
from tests.helpers.jupyter import wait_terminal

GUARD = 60  # seconds
FLOOD = "for i in range(131072):\n    print('x' * 63)\nwhile True:\n    pass\n"  # 8 MiB, spins


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete (opcode, payload) frames in ``data`` sent by a server (never masked)."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            (length,), i = struct.unpack("!H", data[i : i + 2]), i + 2
        elif length == 127:
            (length,), i = struct.unpack("!Q", data[i : i + 8]), i + 8
        if i + length > len(data):
            break
        frames.append((opcode, data[i : i + length]))
        i += length
    return frames


def test_a_client_that_never_reads_holds_nothing_up(
    api, run, jp_http_port, jp_base_url, jp_auth_header, monkeypatch
):
    monkeypatch.setattr(_CrucibleSocket, "write_stall_seconds", 2.0)
    code, execution, _ = api("POST", "executions", body={"code": FLOOD, "timeout": 3})
    assert code == 201, execution
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
    client.connect(("127.0.0.1", jp_http_port))
    headers: dict[str, Any] = {
        "Host": f"127.0.0.1:{jp_http_port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **jp_auth_header,
    }
    path = f"{jp_base_url}crucible/api/executions/{execution['id']}/stream"
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    client.sendall((request + "\r\n").encode())
    try:
        # the server runs on this thread's loop: every api() call lets it work
        final = wait_terminal(api, execution["id"], timeout=GUARD)
        assert final["status"] == "timed_out", final
        assert final["reason"] == "timed out after 3 s"
        status, health, _ = api("GET", "health")
        assert status == 200, health

        # now read: the server gave up on this client (it read nothing for 2 s) and cut the
        # stream before its end, rather than holding it (and the output) for it
        client.setblocking(False)
        received = bytearray()
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                api.sleep(0.05)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            raise AssertionError("the server kept the connection of a client that read nothing")
    finally:
        client.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    messages = [json.loads(p) for op, p in _frames(body) if op == 1]
    assert messages, messages[:1]
    assert messages[0]["seq"] == 0, messages[:1]
    assert not any(m["type"] == "status" and m["status"] == "timed_out" for m in messages)
