"""The installed chart under load on the dev cluster, beside bare Jobs in the same run.

    eval "$(dev/cluster/cluster env)"
    flock /tmp/crucible-k8s.lock .venv/bin/python benchmarks/bench_chart.py \
        [--users 20] [--cells-per-user 10] [--max-concurrent N] [--json]

1. ``helm install`` helm/crucible with ``examples/dev-cluster-values.yaml`` (its own
   namespaces ``crucible-bench-XXXX`` and ``crucible-bench-XXXX-executions``; image
   ``localhost/crucible/service:dev`` as loaded on the node; ``--max-concurrent`` sets
   ``executions.maxConcurrent``, and with it the quota), and beside it the hub of
   ``tests/helm/minihub`` with ``examples/z2jh-values.yaml`` (the service checks every
   token with that hub, in the cluster, as in production). A control service registered
   in the hub (``admin:users``, ``tokens``) makes ``--users`` users and their API tokens,
   as ``tests/helpers/hub.py`` does, plus ``admin`` (crucible's admin scope).
2. The service is reached with ``kubectl port-forward svc/crucible`` (the chart's
   NetworkPolicy admits only the hub and user servers; a port-forward enters the pod's
   own network namespace). All users at once submit ``--cells-per-user`` ``print(1)``
   cells each with ``backend: kubernetes`` (POST executions with the user's token), each
   followed on its WebSocket stream to its terminal event: wall time, throughput, p50/p95
   latency (submit to terminal event), and the medians of submit to the first
   ``running`` status and to the first output. Checks: every cell succeeded printing ``1`` (0
   lost), nothing queued/starting/running service-wide afterwards (0 stuck, as the admin
   sees it), each user lists exactly their own cells and gets 404 on another user's.
3. The reference, same run: as many bare Jobs (``python3 -c 'print(1)'`` on
   ``localhost/crucible/executor:dev``), created at once through the API in a namespace
   of their own (no quota, no policy), each watched (one watch on the namespace) until it
   succeeds: wall time, throughput, p50/p95 (create call to ``succeeded``), lost/stuck.
   The ratio of the two says what the service adds over the cluster's own floor; the
   chart's concurrency (``executions.maxConcurrent``) bounds the service, nothing bounds
   the bare Jobs: they request no resources, so the scheduler places all of them at
   once, while each executor pod requests 0.25 CPU, so a node fits only so many (on the
   2-core dev node about 7, beside the service).
   During each side, every 3 s: the 1-minute load, and the peak of pods Running and of
   pods not scheduled (no node has room) in its namespace.
4. ``helm uninstall`` both releases and delete the namespaces.

Exits 1 if a cell or Job was lost or stuck, or a user saw another's execution. Figures
are medians of one run on a shared machine; no timing is asserted.

Measured 2026-12-06, one run each (2-core machine shared with other test runs;
dev-cluster values: 4 per user, one warm pod; 200 cells from 20 users):
maxConcurrent 8 (the values' own; service image built 00:39; load 1.8-10.2 during the
service side): wall 125 s, 1.61 cells/s, p50 62 s, p95 119 s, 0 lost, 0 stuck, 0 seen by
others, 7 executor pods ran at once; bare Jobs (load up to 34): wall 78 s, p50 60 s, p95
76 s; service/bare: wall 1.61, p50 1.03, p95 1.57.
--max-concurrent 4 (image of 23:36; load 2.7-9.0): wall 161 s, p50 87 s, p95 155 s, 0
lost; bare Jobs wall 80 s; service/bare: wall 2.02, p50 1.38.
--max-concurrent 16 (image of 23:36; load 4.0-11.3): wall 194 s, p50 79 s, p95 148 s, 13
cells timed out (their pods waited for a node: at most 5 executor pods ran, up to 15 were
not placed); bare Jobs wall 87 s; service/bare: wall 2.23.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests
from kubernetes_asyncio import client, config, watch
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.helm.chart import CHART, EXAMPLES, Helm  # noqa: E402
from tests.helm.cluster import SCRIPT, Cluster  # noqa: E402

MINIHUB = REPO / "tests" / "helm" / "minihub"
EXECUTOR = "localhost/crucible/executor:dev"
UNFINISHED = ("queued", "starting", "running")
GUARD = 600  # seconds any wait may take before the run gives up (not a timing check)


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


class PortForward:
    """``kubectl port-forward TARGET`` in ``namespace`` to a free port on 127.0.0.1."""

    def __init__(self, cluster: Cluster, namespace: str, target: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [cluster.kubectl_path, "--kubeconfig", cluster.kubeconfig, "-n", namespace,
             "port-forward", "--address", "127.0.0.1", target, f":{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"kubectl port-forward {target}: {line}")
        self.url = f"http://127.0.0.1:{found.group(1)}"

    def stop(self) -> None:
        """Stop kubectl."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def wait_for(what: str, probe: Any, seconds: float = GUARD) -> Any:
    """Poll ``probe()`` until it returns something true; RuntimeError past ``seconds``."""
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = probe()
        except (requests.RequestException, ValueError) as e:
            found, last = None, e
        if found:
            return found
        time.sleep(1)
    raise RuntimeError(f"{what}: not within {seconds:g} s (last error: {last})")


def ready_pod(cluster: Cluster, namespace: str, selector: str) -> bool:
    """Whether a pod matching ``selector`` is ready (and not terminating)."""
    out = cluster.kubectl("-n", namespace, "get", "pods", "-l", selector, "-o", "json",
                          check=False).stdout  # fmt: skip
    for pod in json.loads(out or '{"items": []}')["items"]:
        conditions = pod.get("status", {}).get("conditions") or []
        if not pod["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in conditions
        ):
            return True
    return False


class Install:
    """Both releases in one namespace (the service's executions in a second one)."""

    def __init__(self, cluster: Cluster, suffix: str, max_concurrent: int | None) -> None:
        self.cluster = cluster
        self.overrides = [] if max_concurrent is None else [
            "--set", f"executions.maxConcurrent={max_concurrent}"
        ]  # fmt: skip
        self.namespace = f"crucible-bench-{suffix}"
        self.executions = f"{self.namespace}-executions"
        self.control_token = secrets.token_hex(32)

    def up(self) -> None:
        """Install the chart and the hub; wait until both pods are ready."""
        self.cluster.helm(
            "install", "crucible", str(CHART), "--namespace", self.namespace, "--create-namespace",
            "-f", str(EXAMPLES / "dev-cluster-values.yaml"),
            "--set", f"executions.namespace={self.executions}", *self.overrides,
        )  # fmt: skip
        self.cluster.helm(
            "install", "jupyterhub", str(MINIHUB), "--namespace", self.namespace,
            "-f", str(EXAMPLES / "z2jh-values.yaml"),
            "--set", f"hub.dummyPassword={secrets.token_urlsafe(12)}",
            "--set", f"hub.services.crucible.url=http://crucible.{self.namespace}.svc:8576",
            "--set-json", "hub.services.benchcontrol="
            + json.dumps({"apiToken": self.control_token, "display": False}),
            "--set-json", "hub.loadRoles.benchcontrol=" + json.dumps(
                {"scopes": ["admin:users", "tokens"], "services": ["benchcontrol"]}
            ),
        )  # fmt: skip
        for selector in ("component=hub", "component=proxy", "app.kubernetes.io/component=service"):
            wait_for(f"a ready pod {selector}",
                     lambda s=selector: ready_pod(self.cluster, self.namespace, s))  # fmt: skip

    def dump(self) -> None:
        """The namespaces' objects and events, and the service's log (after a failure)."""
        for ns in (self.namespace, self.executions):
            print(self.cluster.kubectl("-n", ns, "get", "all,events", check=False).stdout)
        print(self.cluster.kubectl("-n", self.namespace, "logs", "statefulset/crucible",
                                   "--tail=60", check=False).stdout)  # fmt: skip

    def down(self) -> None:
        """Uninstall both releases and delete the namespaces (without waiting for it)."""
        for release in ("jupyterhub", "crucible"):
            self.cluster.helm("uninstall", release, "--namespace", self.namespace, "--wait",
                              "--timeout", "120s", check=False)  # fmt: skip
        for ns in (self.executions, self.namespace):
            self.cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false",
                                 check=False)  # fmt: skip


def make_users(hub_api: str, control_token: str, names: list[str]) -> dict[str, str]:
    """Hub users ``names`` with an API token each: ``{name: token}``."""
    control = {"Authorization": f"token {control_token}"}
    r = wait_for(
        "the hub's API",
        lambda: (r := requests.post(f"{hub_api}/users", json={"usernames": names},
                                    headers=control, timeout=60)).status_code in (201, 409) and r,
    )  # fmt: skip
    tokens = {}
    for name in names:
        r = requests.post(f"{hub_api}/users/{name}/tokens", json={"note": "bench_chart"},
                          headers=control, timeout=60)  # fmt: skip
        if r.status_code != 201:
            raise RuntimeError(f"token for {name}: {r.status_code} {r.text}")
        tokens[name] = r.json()["token"]
    return tokens


async def run_cell(
    http: AsyncHTTPClient, api: str, token: str
) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
    """``(phases, execution, events)`` of one print(1) cell.

    ``phases``: seconds from submit to the first ``running`` status (``running_s``), to
    the first output (``first_output_s``) and to the terminal event (``end_s``), as the
    client receives them; a phase never seen is absent.
    """
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    t0 = time.perf_counter()
    response = await http.fetch(
        HTTPRequest(
            api + "executions", method="POST", headers=headers, request_timeout=GUARD,
            body=json.dumps({"code": "print(1)", "backend": "kubernetes"}),
        )
    )  # fmt: skip
    execution = json.loads(response.body)
    url = f"{api.replace('http://', 'ws://', 1)}executions/{execution['id']}/stream"
    conn = await websocket_connect(
        HTTPRequest(url, headers=headers, request_timeout=GUARD), ping_interval=None
    )
    events = []
    phases: dict[str, float] = {}
    try:
        while (message := await asyncio.wait_for(conn.read_message(), GUARD)) is not None:
            now = time.perf_counter() - t0
            event = json.loads(message)
            events.append(event)
            if event.get("type") == "stream":
                phases.setdefault("first_output_s", now)
            if event.get("type") == "status" and event.get("status") == "running":
                phases.setdefault("running_s", now)
            if event.get("type") == "status" and event.get("status") not in UNFINISHED:
                phases["end_s"] = now
                break
    finally:
        conn.close()
    phases.setdefault("end_s", time.perf_counter() - t0)  # the stream ended without one
    return phases, execution, events


async def through_service(api: str, tokens: dict[str, str], per_user: int) -> dict[str, Any]:
    """Every user's ``per_user`` cells at once through the service; figures and checks."""
    users = [name for name in tokens if name != "admin"]
    for name in users:  # the service learns each token from the hub once (cached after)
        r = requests.get(f"{api}executions", headers={"Authorization": f"token {tokens[name]}"},
                         timeout=60)  # fmt: skip
        if r.status_code != 200:
            raise RuntimeError(f"{name} cannot list executions: {r.status_code} {r.text}")
    AsyncHTTPClient.configure(None, max_clients=len(users) * per_user + 10)
    http = AsyncHTTPClient(force_instance=True)
    jobs = [(name, i) for i in range(per_user) for name in users]
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(run_cell(http, api, tokens[name]) for name, _ in jobs), return_exceptions=True
    )
    wall = time.perf_counter() - t0
    http.close()

    latencies, lost = [], []
    phases: dict[str, list[float]] = {"running_s": [], "first_output_s": []}
    mine: dict[str, set[str]] = {name: set() for name in users}
    for (name, i), result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            lost.append(f"{name} {i}: {result!r}")
            continue
        seen, execution, events = result
        mine[name].add(execution["id"])
        latencies.append(seen["end_s"])
        for phase, values in phases.items():
            if phase in seen:
                values.append(seen[phase])
        stdout = "".join(e.get("text", "") for e in events if e.get("type") == "stream")
        if not events or events[-1].get("status") != "succeeded" or stdout != "1\n":
            lost.append(f"{name} {i}: {events[-1] if events else None} {stdout!r}")

    admin = {"Authorization": f"token {tokens['admin']}"}
    stuck = 0
    for status in UNFINISHED:
        r = requests.get(f"{api}executions", params={"status": status, "limit": 500},
                         headers=admin, timeout=60)  # fmt: skip
        stuck += len(r.json()["executions"])
    r = requests.get(f"{api}executions", params={"limit": 500}, headers=admin, timeout=60)
    backends = {(e.get("backend"), e.get("isolation")) for e in r.json()["executions"]}
    leaks = []
    for k, name in enumerate(users):
        headers = {"Authorization": f"token {tokens[name]}"}
        r = requests.get(f"{api}executions", params={"limit": 500}, headers=headers, timeout=60)
        listed = {e["id"] for e in r.json()["executions"]}
        if listed != mine[name]:
            leaks.append(f"{name} lists {len(listed)} ids, has {len(mine[name])}")
        other = users[(k + 1) % len(users)]
        for execution_id in sorted(mine[other])[:2]:
            r = requests.get(f"{api}executions/{execution_id}", headers=headers, timeout=60)
            if r.status_code != 404:
                leaks.append(f"{name} got {r.status_code} on {other}'s {execution_id}")
    return {
        "cells": len(jobs),
        "wall_s": wall,
        "latencies": latencies,
        "phases": phases,
        "lost": len(lost),
        "stuck": stuck,
        "visibility_violations": len(leaks),
        "backends": sorted(map(str, backends)),
        "problems": (lost + leaks)[:20],
    }


async def sample(kubeconfig: str, namespace: str, done: asyncio.Event) -> dict[str, float]:
    """Every 3 s until ``done``: the 1-minute load, and ``namespace``'s pods.

    Returns the load's range and the peaks of pods Running and of pods the scheduler has
    not placed (``PodScheduled`` false: no node has room for their requests), which says
    whether the node, not the chart's concurrency, bounded the run.
    """
    api = await config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    loads, running, unscheduled = [], [0], [0]
    try:
        while not done.is_set():
            loads.append(os.getloadavg()[0])
            with contextlib.suppress(client.ApiException):  # the namespace may not exist yet
                raw = await core.list_namespaced_pod(namespace, _preload_content=False)
                pods = json.loads(await raw.read())["items"]
                running.append(sum(p["status"].get("phase") == "Running" for p in pods))
                unscheduled.append(sum(
                    any(c["type"] == "PodScheduled" and c["status"] == "False"
                        for c in p["status"].get("conditions") or [])
                    for p in pods
                ))  # fmt: skip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 3)
    finally:
        await api.close()
    return {
        "load_min": min(loads, default=float("nan")),
        "load_max": max(loads, default=float("nan")),
        "running_max": max(running),
        "unscheduled_max": max(unscheduled),
    }


async def sampled(kubeconfig: str, namespace: str, work: Any) -> dict[str, Any]:
    """The figures of awaiting ``work``, with ``sample(namespace)`` taken meanwhile."""
    done = asyncio.Event()
    sampler = asyncio.ensure_future(sample(kubeconfig, namespace, done))
    try:
        figures = await work
    finally:
        done.set()
        machine = await sampler
    return {**figures, "sampled": machine}


def bare_job(name: str, run: str) -> dict[str, Any]:
    """A Job running ``python3 -c 'print(1)'`` on the executor image, labelled ``run``."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"bench": run}},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"bench": run}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "c",
                            "image": EXECUTOR,
                            "imagePullPolicy": "Never",
                            "command": ["python3", "-c", "print(1)"],
                        }
                    ],
                },
            },
        },
    }


async def bare_jobs(kubeconfig: str, namespace: str, count: int) -> dict[str, Any]:
    """``count`` bare Jobs created at once, watched until each succeeds (or fails)."""
    api = await config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    await core.create_namespace({"metadata": {"name": namespace}})
    run = uuid.uuid4().hex[:8]
    names = [f"bare-{run}-{i:03d}" for i in range(count)]
    created: dict[str, float] = {}
    ended: dict[str, tuple[float, str]] = {}
    try:
        listing = await batch.list_namespaced_job(namespace, label_selector=f"bench={run}")
        version = listing.metadata.resource_version

        async def follow() -> None:
            w = watch.Watch()
            async with w.stream(batch.list_namespaced_job, namespace, label_selector=f"bench={run}",
                                resource_version=version, timeout_seconds=GUARD) as stream:  # fmt: skip
                async for event in stream:
                    obj = event["raw_object"]
                    status = obj.get("status") or {}
                    name = obj["metadata"]["name"]
                    if name not in ended and (status.get("succeeded") or status.get("failed")):
                        ended[name] = (
                            time.perf_counter(),
                            "succeeded" if status.get("succeeded") else "failed",
                        )
                        if len(ended) == count:
                            return

        watcher = asyncio.ensure_future(follow())

        async def create(name: str) -> None:
            created[name] = time.perf_counter()
            await batch.create_namespaced_job(namespace, bare_job(name, run))

        t0 = time.perf_counter()
        await asyncio.gather(*(create(n) for n in names))
        with contextlib.suppress(asyncio.TimeoutError):  # the unfinished ones count as stuck
            await asyncio.wait_for(watcher, GUARD)
        wall = max((t for t, _ in ended.values()), default=time.perf_counter()) - t0
        latencies = [ended[n][0] - created[n] for n in names if n in ended]
        failed = [n for n, (_, how) in ended.items() if how != "succeeded"]
        logs_ok, seen = 0, ""
        pods = await core.list_namespaced_pod(namespace, label_selector=f"bench={run}")
        for pod in pods.items[:5]:  # a sample: the Jobs printed what they were told to
            log = await core.read_namespaced_pod_log(pod.metadata.name, namespace)
            logs_ok += str(log).strip() == "1"
            seen = seen or repr(log)[:80]
        return {
            "cells": count,
            "wall_s": wall,
            "latencies": latencies,
            "lost": len(failed),
            "stuck": count - len(ended),
            "log_sample": f"{logs_ok}/{min(5, len(pods.items))} pods logged '1' (first: {seen})",
        }
    finally:
        await core.delete_namespace(namespace, propagation_policy="Background")
        await api.close()


def summary(figures: dict[str, Any]) -> dict[str, float]:
    """Wall, throughput, p50/p95 of latency and the medians of the phases seen, of one side."""
    lat = figures["latencies"] or [float("nan")]
    phases = {
        f"{phase[:-2]}_p50_s": statistics.median(values) if values else float("nan")
        for phase, values in figures.get("phases", {}).items()
    }
    return {
        "wall_s": figures["wall_s"],
        "per_s": figures["cells"] / figures["wall_s"],
        "p50_s": statistics.median(lat),
        "p95_s": pct(lat, 95),
        **phases,
    }


def report(
    crucible: dict[str, Any], bare: dict[str, Any], args: argparse.Namespace,
    load_before: float, installed_s: float,
) -> None:  # fmt: skip
    """Print the table of both sides, their ratios and the machine's condition."""
    s, b = summary(crucible), summary(bare)
    mc = "8 (dev-cluster values)" if args.max_concurrent is None else str(args.max_concurrent)
    print(
        f"machine: {os.cpu_count()} CPUs, 1-minute load {load_before:.1f} before,"
        f" {os.getloadavg()[0]:.1f} after; chart installed and ready in {installed_s:.0f} s"
    )
    print(
        f"{crucible['cells']} print(1) cells from {args.users} users at once"
        f" (chart: examples/dev-cluster-values.yaml, executions.maxConcurrent {mc})"
        f" vs {bare['cells']} bare Jobs at once:"
    )
    print(f"{'':20s} {'wall s':>7s} {'cells/s':>7s} {'run p50':>7s} {'out p50':>7s}"
          f" {'p50 s':>6s} {'p95 s':>6s} {'lost':>4s} {'stuck':>5s} {'leaks':>5s}"
          f" {'load':>9s} {'pods run':>8s} {'unplaced':>8s}")  # fmt: skip
    for label, f, x, leaks in (
        ("service (REST+WS)", crucible, s, str(crucible["visibility_violations"])),
        ("bare Jobs (watched)", bare, b, "-"),
    ):
        m = f["sampled"]
        print(f"{label:20s} {x['wall_s']:7.1f} {x['per_s']:7.2f}"
              f" {x.get('running_p50_s', float('nan')):7.2f}"
              f" {x.get('first_output_p50_s', float('nan')):7.2f}"
              f" {x['p50_s']:6.2f} {x['p95_s']:6.2f} {f['lost']:4d} {f['stuck']:5d} {leaks:>5s}"
              f" {m['load_min']:4.1f}-{m['load_max']:<4.1f} {m['running_max']:8d}"
              f" {m['unscheduled_max']:8d}")  # fmt: skip
    print(f"{'ratio service/bare':20s} {s['wall_s'] / b['wall_s']:7.2f}"
          f" {s['per_s'] / b['per_s']:7.2f} {'':7s} {'':7s}"
          f" {s['p50_s'] / b['p50_s']:6.2f} {s['p95_s'] / b['p95_s']:6.2f}")  # fmt: skip
    print(
        "run/out p50: submit to the first 'running' status / the first output (service only;"
        " a bare Job's output is not followed). load: 1-minute load range during the phase;"
        " pods run / unplaced: peak pods Running / not scheduled (no room on the node)"
        " in the phase's namespace (the service's includes its warm pod)."
    )
    print(
        f"service executions (backend, isolation): {crucible['backends']}; bare: {bare['log_sample']}"
    )
    for problem in crucible["problems"]:
        print(f"  {problem}")
    if args.json:
        print(json.dumps({"service": {**crucible, **s}, "bare": {**bare, **b}}))


def main() -> None:
    """Install, measure both sides, uninstall, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="users at once (20)")
    parser.add_argument("--cells-per-user", type=int, default=10, help="print(1) cells each (10)")
    parser.add_argument(
        "--max-concurrent", type=int, default=None,
        help="the chart's executions.maxConcurrent (default: the dev-cluster values' 8)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    env = {**os.environ}
    kubeconfig = (
        env.get("CRUCIBLE_CLUSTER_KUBECONFIG")
        or subprocess.run(
            [str(SCRIPT), "kubeconfig"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    bin_dir = Path(
        subprocess.run(
            [str(SCRIPT), "bin-dir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    cluster = Cluster(kubeconfig, bin_dir, Helm(str(bin_dir / "helm")))
    suffix = uuid.uuid4().hex[:6]
    install = Install(cluster, suffix, args.max_concurrent)
    load_before = os.getloadavg()[0]
    forwards: list[PortForward] = []
    failed = True
    try:
        started = time.monotonic()
        install.up()
        installed_s = time.monotonic() - started
        hub = PortForward(cluster, install.namespace, "svc/hub", 8081)
        forwards.append(hub)
        service = PortForward(cluster, install.namespace, "svc/crucible", 8576)
        forwards.append(service)
        names = [f"user{i:02d}" for i in range(args.users)] + ["admin"]
        tokens = make_users(f"{hub.url}/hub/api", install.control_token, names)
        api = f"{service.url}/services/crucible/api/"
        crucible = asyncio.run(
            sampled(kubeconfig, install.executions,
                    through_service(api, tokens, args.cells_per_user))
        )  # fmt: skip
        bare_ns = f"crucible-bench-{suffix}-bare"
        bare = asyncio.run(
            sampled(kubeconfig, bare_ns,
                    bare_jobs(kubeconfig, bare_ns, args.users * args.cells_per_user))
        )  # fmt: skip
        failed = bool(
            crucible["lost"] or crucible["stuck"] or crucible["visibility_violations"]
            or bare["lost"] or bare["stuck"]
        )  # fmt: skip
    finally:
        for forward in forwards:
            forward.stop()
        if failed:
            install.dump()
        install.down()
    report(crucible, bare, args, load_before, installed_s)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
