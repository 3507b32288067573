"""Cost of running cells through the JupyterHub crucible service, against a real hub.

    .venv/bin/python benchmarks/bench_hub.py [--runs 100] [--users 20] [--cells-per-user 10]

Starts JupyterHub with the configuration of tests/hub (dummy authenticator, the real
configurable-http-proxy, local-process spawner, ``crucible serve`` as a hub-managed service
on SQLite, local bubblewrap backend, the dispatcher's default settings unless
``--service-arg`` says otherwise) in a temporary directory, and measures:

1. ``print(1)`` through a user server in remote mode (alice's: forwarded to the service with
   the server's hub token) and through a user server that embeds its own dispatcher (user
   ``embedded``), interleaved in the same run, both through the hub's proxy, each as the
   magic does it: POST executions, then the execution's WebSocket stream until its terminal
   event. p50/p95 of each and the p50 the service path adds (goal: at most 10 ms).
2. ``--users`` users submitting ``--cells-per-user`` cells each, all at once, straight to the
   service with their own tokens, each cell followed on its stream: wall time, throughput,
   p50/p95 latency (submit to terminal event). Then the checks: every cell succeeded with
   its own output (0 lost), nothing queued, starting or running service-wide (0 stuck),
   each user lists exactly their own cells and gets 404 on another user's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.hub import Hub, start_hub, user_server

UNFINISHED = ("queued", "starting", "running")


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def run_cell(
    http: AsyncHTTPClient, api: str, token: str, code: str
) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    """``(seconds from submit to terminal event, execution, events)`` of one cell."""
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    t0 = time.perf_counter()
    response = await http.fetch(
        HTTPRequest(
            api + "executions",
            method="POST",
            headers=headers,
            body=json.dumps({"code": code}),
            request_timeout=300,
        )
    )
    execution = json.loads(response.body)
    url = f"{api.replace('http://', 'ws://', 1)}executions/{execution['id']}/stream"
    conn = await websocket_connect(
        HTTPRequest(url, headers=headers, request_timeout=300), ping_interval=None
    )
    events = []
    try:
        while (message := await conn.read_message()) is not None:
            event = json.loads(message)
            events.append(event)
            if event.get("type") == "status" and event.get("status") not in UNFINISHED:
                break
    finally:
        conn.close()
    return time.perf_counter() - t0, execution, events


async def paths(hub: Hub, runs: int, warmup: int) -> dict[str, Any]:
    """``print(1)`` through alice's remote-mode server and the embedded-mode server."""
    http = AsyncHTTPClient(force_instance=True)
    with user_server(hub, "alice") as remote, user_server(hub, "embedded") as embedded:
        targets = {
            "remote": (remote.api, hub.tokens["alice"]),
            "embedded": (embedded.api, hub.tokens["embedded"]),
        }
        times: dict[str, list[float]] = {name: [] for name in targets}
        for i in range(warmup + runs):
            for name, (api, token) in targets.items():
                seconds, _, events = await run_cell(http, api, token, "print(1)")
                assert events[-1]["status"] == "succeeded", events
                if i >= warmup:
                    times[name].append(seconds * 1000)
    http.close()
    out: dict[str, Any] = {
        name: {"p50_ms": statistics.median(v), "p95_ms": pct(v, 95), "runs": len(v)}
        for name, v in times.items()
    }
    out["added_p50_ms"] = out["remote"]["p50_ms"] - out["embedded"]["p50_ms"]
    return out


def make_users(hub: Hub, count: int) -> dict[str, str]:
    """``count`` hub users with API tokens: ``{name: token}``."""
    control = {"Authorization": f"token {hub.control_token}"}
    names = [f"user{i:02d}" for i in range(count)]
    r = requests.post(
        f"{hub.api_url}/users", json={"usernames": names}, headers=control, timeout=60
    )
    assert r.status_code in (201, 409), r.text
    tokens = {}
    for name in names:
        r = requests.post(
            f"{hub.api_url}/users/{name}/tokens",
            json={"note": "bench"},
            headers=control,
            timeout=60,
        )
        assert r.status_code == 201, r.text
        tokens[name] = r.json()["token"]
    return tokens


async def burst(hub: Hub, users: int, per_user: int) -> dict[str, Any]:
    """``users`` x ``per_user`` cells at once through the service; figures and checks."""
    tokens = make_users(hub, users)
    AsyncHTTPClient.configure(None, max_clients=users * per_user + 10)
    http = AsyncHTTPClient(force_instance=True)
    api = hub.service_url + "api/"
    jobs = [(name, i) for i in range(per_user) for name in tokens]
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(run_cell(http, api, tokens[name], f"print('{name} {i}')") for name, i in jobs),
        return_exceptions=True,
    )
    wall = time.perf_counter() - t0
    http.close()

    latencies, lost, mine = [], [], {name: set() for name in tokens}
    for (name, i), result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            lost.append(f"{name} {i}: {result!r}")
            continue
        seconds, execution, events = result
        mine[name].add(execution["id"])
        latencies.append(seconds * 1000)
        stdout = "".join(e.get("text", "") for e in events if e.get("type") == "stream")
        if events[-1].get("status") != "succeeded" or stdout != f"{name} {i}\n":
            lost.append(f"{name} {i}: {events[-1]} {stdout!r}")

    admin = {"Authorization": f"token {hub.tokens['admin']}"}
    stuck = 0
    for status in UNFINISHED:
        r = requests.get(
            f"{api}executions", params={"status": status, "limit": 500}, headers=admin, timeout=60
        )
        stuck += len(r.json()["executions"])
    leaks = []
    names = list(tokens)
    for k, name in enumerate(names):
        headers = {"Authorization": f"token {tokens[name]}"}
        r = requests.get(f"{api}executions", params={"limit": 500}, headers=headers, timeout=60)
        listed = {e["id"] for e in r.json()["executions"]}
        if listed != mine[name]:
            leaks.append(f"{name} lists {len(listed)} ids, has {len(mine[name])}")
        other = names[(k + 1) % len(names)]
        for execution_id in sorted(mine[other])[:per_user]:
            r = requests.get(f"{api}executions/{execution_id}", headers=headers, timeout=60)
            if r.status_code != 404:
                leaks.append(f"{name} got {r.status_code} on {other}'s {execution_id}")
    return {
        "cells": len(jobs),
        "users": users,
        "wall_s": wall,
        "throughput_per_s": len(jobs) / wall,
        "p50_ms": statistics.median(latencies) if latencies else None,
        "p95_ms": pct(latencies, 95) if latencies else None,
        "lost": len(lost),
        "stuck": stuck,
        "visibility_violations": len(leaks),
        "problems": (lost + leaks)[:20],
    }


async def main_async(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with start_hub(tmp, tuple(args.service_arg)) as hub:
        figures = {"paths": await paths(hub, args.runs, args.warmup)}
        figures["burst"] = await burst(hub, args.users, args.cells_per_user)
    return figures


def main() -> None:
    """Run both measurements and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="print(1) cells per path (100)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed cells per path first (5)")
    parser.add_argument("--users", type=int, default=20, help="users in the burst (20)")
    parser.add_argument("--cells-per-user", type=int, default=10, help="cells each (10)")
    parser.add_argument(
        "--service-arg",
        action="append",
        default=[],
        help="extra option of `crucible serve` (repeatable), e.g."
        " --service-arg=--CrucibleDispatcher.max_concurrency=4",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        figures = asyncio.run(main_async(args, Path(tmp)))
    figures["load_average"] = [load_before, os.getloadavg()[0]]
    figures["cpus"] = os.cpu_count()
    p, b = figures["paths"], figures["burst"]
    print(
        f"machine: {figures['cpus']} CPUs, 1-minute load average {load_before:.1f} before,"
        f" {figures['load_average'][1]:.1f} after (other work on the machine slows both paths)"
    )
    print(f"print(1) through a user server, {p['remote']['runs']} runs each, interleaved:")
    for name in ("embedded", "remote"):
        print(f"  {name:9s} p50 {p[name]['p50_ms']:7.1f} ms   p95 {p[name]['p95_ms']:7.1f} ms")
    print(f"  the service path adds {p['added_p50_ms']:+.1f} ms p50 (goal <= 10 ms)")
    print(f"{b['cells']} cells from {b['users']} users at once through the service:")
    print(f"  wall {b['wall_s']:.2f} s, throughput {b['throughput_per_s']:.1f} cells/s")
    print(f"  latency p50 {b['p50_ms']:.0f} ms, p95 {b['p95_ms']:.0f} ms")
    print(
        f"  lost {b['lost']}, stuck {b['stuck']},"
        f" visibility violations {b['visibility_violations']}"
    )
    for problem in b["problems"]:
        print(f"    {problem}")
    if args.json:
        print(json.dumps(figures))
    if b["lost"] or b["stuck"] or b["visibility_violations"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
