#!/usr/bin/env python3
"""Ask a DNS server for a name's A record once; exit 0 if it answers with an address.

Usage: dnsprobe.py SERVER NAME [--timeout SECONDS]

Prints the addresses. `cluster up` uses it to wait until the cluster DNS (CoreDNS behind
the kube-dns Service's ClusterIP, reached through kube-proxy's rules) resolves a name;
the standard library has no DNS client, and this needs nothing installed.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys


def query(server: str, name: str, timeout: float) -> list[str]:
    """The IPv4 addresses of NAME's A record per SERVER (UDP, port 53), or OSError."""
    qid = int.from_bytes(os.urandom(2), "big")
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, 53))
        data, _ = s.recvfrom(4096)
    rid, flags, _qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if rid != qid:
        raise OSError(f"answer for another query ({rid} != {qid})")
    if flags & 0xF:
        raise OSError(f"rcode {flags & 0xF}")
    pos = 12 + len(qname) + 4
    addrs = []
    for _ in range(an):
        while data[pos] and data[pos] & 0xC0 != 0xC0:  # name: labels, maybe ending in a pointer
            pos += 1 + data[pos]
        pos += 2 if data[pos] & 0xC0 == 0xC0 else 1
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", data[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[pos : pos + 4]))
        pos += rdlen
    if not addrs:
        raise OSError("no A record in the answer")
    return addrs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("name")
    ap.add_argument("--timeout", type=float, default=1.0)
    a = ap.parse_args()
    try:
        print(" ".join(query(a.server, a.name, a.timeout)))
    except OSError as e:
        print(f"{a.name} @{a.server}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
