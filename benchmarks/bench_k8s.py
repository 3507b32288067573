"""Kubernetes backend latency on the real dev cluster, beside a bare Job in the same run.

    dev/cluster/cluster up
    .venv/bin/python benchmarks/bench_k8s.py [--runs 50]

1. ``print(1)`` submitted → finished through the dispatcher and the Kubernetes backend,
   cold (a Job per cell, ``warm_pods = 0``) and on a warm pod (``warm_pods = 1``),
   interleaved run by run with the reference: a bare Job (same image, ``python3 -c
   'print(1)'``) created through the API and watched until it completes — the cluster's
   own floor. Before each run the warm pool is full and idle (nothing starts beside the
   measured cell), and each measurement starts after a random pause of up to 1 s: the
   kubelet reports a container's end at its next relist (every 1 s), and without the
   pause every run would start just after one (the previous run ended on one), which
   makes the end of a short cell wait for almost a whole period, always. Reports p50/p95 of all three (goals: p50 ≤ 2.5 s cold, ≤ 300 ms warm;
   the seed platform took 10–15 s).
2. First-output latency: a cell prints ``time.time()`` then sleeps; the time from that
   print to the event reaching a dispatcher subscriber (goal: p50 ≤ 250 ms), cold and warm.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from kubernetes_asyncio import client, config, watch
from traitlets.config import Config

from crucible_jupyter.dispatcher import Dispatcher

CLUSTER = Path(__file__).resolve().parents[1] / "dev" / "cluster" / "cluster"
IMAGE = "localhost/crucible/executor:dev"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


async def bare_job(batch: client.BatchV1Api, namespace: str) -> float:
    """Seconds for a bare Job running ``print(1)`` to complete, watched (not polled)."""
    name = f"bare-{uuid.uuid4().hex[:10]}"
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "c",
                            "image": IMAGE,
                            "imagePullPolicy": "Never",
                            "command": ["python3", "-c", "print(1)"],
                        }
                    ],
                }
            },
        },
    }
    t0 = time.perf_counter()
    await batch.create_namespaced_job(namespace, body)
    async with watch.Watch().stream(
        batch.list_namespaced_job,
        namespace,
        field_selector=f"metadata.name={name}",
        timeout_seconds=120,
    ) as stream:
        async for event in stream:
            if (event["raw_object"].get("status") or {}).get("succeeded"):
                break
    elapsed = time.perf_counter() - t0
    await batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
    return elapsed


async def through_crucible(d: Dispatcher, isolation: str = "kubernetes") -> tuple[float, float]:
    """Seconds from submit to the terminal status of a ``print(1)`` cell, and from submit
    to its output reaching a subscriber (what the notebook shows first)."""
    t0 = time.perf_counter()
    execution = await d.submit({"code": "print(1)"})
    output = None
    async for event in d.subscribe(execution.id):
        if event.type == "stream" and output is None:
            output = time.perf_counter() - t0
    final = await d.wait(execution.id)
    elapsed = time.perf_counter() - t0
    assert final.status.value == "succeeded", final.reason
    assert final.isolation == isolation, (final.isolation, isolation)
    return elapsed, output


async def pool_idle(d: Dispatcher) -> None:
    """Wait until ``d``'s warm pool is full and no pod of it is starting."""
    backend = d.get_backend("kubernetes")
    await backend.prepare()
    pool = backend._pool
    while len(pool.warm_pods()) < pool.size or pool._starting:
        await asyncio.sleep(0.1)


async def first_output(d: Dispatcher, prints: int = 5) -> list[float]:
    """Milliseconds from each ``print`` inside the pod to its event in the dispatcher."""
    code = (
        "import time\n"
        f"for _ in range({prints}):\n"
        "    print(repr(time.time()), flush=True)\n"
        "    time.sleep(0.3)\n"
    )
    execution = await d.submit({"code": code})
    out = []
    async for event in d.subscribe(execution.id):
        if event.type == "stream":
            now = time.time()
            for line in event.data["text"].split():
                out.append((now - float(line)) * 1000)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--namespace", default=f"crucible-bench-{uuid.uuid4().hex[:6]}")
    args = ap.parse_args()
    kubeconfig = subprocess.run(
        [str(CLUSTER), "kubeconfig"], capture_output=True, text=True, check=True
    ).stdout.strip()
    api = await config.new_client_from_config(config_file=kubeconfig)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    await core.create_namespace({"metadata": {"name": args.namespace}})
    with tempfile.TemporaryDirectory() as tmp:
        dispatchers = []
        for name, warm_pods in (("cold", 0), ("warm", 1)):
            c = Config()
            c.CrucibleDispatcher.db_url = f"sqlite:///{tmp}/{name}.db"
            c.CrucibleDispatcher.backend = "kubernetes"
            c.CrucibleKubernetesBackend.namespace = args.namespace
            c.CrucibleKubernetesBackend.kubeconfig = kubeconfig
            c.CrucibleKubernetesBackend.warm_pods = warm_pods
            dispatchers.append(Dispatcher(config=c))
        cold, warm = dispatchers
        for d in dispatchers:
            await d.start()
        try:
            await through_crucible(cold)
            await bare_job(batch, args.namespace)
            await pool_idle(warm)
            await through_crucible(warm, "kubernetes+warm")
            ours, warms, ref, shown, warm_shown = [], [], [], [], []
            for _ in range(args.runs):
                await pool_idle(warm)
                await asyncio.sleep(random.random())
                ref.append(await bare_job(batch, args.namespace))
                await asyncio.sleep(random.random())
                finished, output = await through_crucible(cold)
                ours.append(finished)
                shown.append(output)
                await asyncio.sleep(random.random())
                finished, output = await through_crucible(warm, "kubernetes+warm")
                warms.append(finished)
                warm_shown.append(output)
            latencies, warm_latencies = [], []
            for _ in range(6):
                latencies += await first_output(cold)
                await pool_idle(warm)
                warm_latencies += await first_output(warm)
            print(f"{'path':46} {'p50 s':>7} {'p95 s':>7}")
            for label, values in (
                ("bare Job print(1), watched (reference)", ref),
                ("crucible print(1), cold (a Job per cell)", ours),
                ("crucible print(1), warm pod", warms),
                ("  cold: submitted -> output at a subscriber", shown),
                ("  warm: submitted -> output at a subscriber", warm_shown),
            ):
                print(f"{label:46} {pct(values, 50):7.3f} {pct(values, 95):7.3f}")
            ref50 = statistics.median(ref)
            print(
                f"ratio of medians to the bare Job: cold {statistics.median(ours) / ref50:.2f}x,"
                f" warm {statistics.median(warms) / ref50:.3f}x;"
                f" warm / cold {statistics.median(warms) / statistics.median(ours):.3f}x"
            )
            for label, values in (("cold", latencies), ("warm", warm_latencies)):
                print(
                    f"first output ({label}), print in pod -> dispatcher subscriber:"
                    f" p50 {pct(values, 50):.0f} ms, p95 {pct(values, 95):.0f} ms"
                    f" ({len(values)} prints)"
                )
        finally:
            for d in dispatchers:
                await d.stop()
            await core.delete_namespace(args.namespace)
            await api.close()


if __name__ == "__main__":
    asyncio.run(main())
