"""Kubernetes backend latency on the real dev cluster, beside a bare Job in the same run.

    dev/cluster/cluster up
    .venv/bin/python benchmarks/bench_k8s.py [--runs 50]

1. ``print(1)`` submitted → finished through the dispatcher and the Kubernetes backend,
   interleaved run by run with the reference: a bare Job (same image, ``python3 -c
   'print(1)'``) created through the API and watched until it completes — the cluster's
   own floor. Reports p50/p95 of both (goal: p50 ≤ 2.5 s; the seed platform took 10–15 s).
2. First-output latency: a cell prints ``time.time()`` then sleeps; the time from that
   print to the event reaching a dispatcher subscriber (goal: p50 ≤ 250 ms).
"""

from __future__ import annotations

import argparse
import asyncio
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


async def through_crucible(d: Dispatcher) -> float:
    """Seconds from submit to the terminal status of a ``print(1)`` cell."""
    t0 = time.perf_counter()
    execution = await d.submit({"code": "print(1)"})
    final = await d.wait(execution.id)
    assert final.status.value == "succeeded", final.reason
    return time.perf_counter() - t0


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
        c = Config()
        c.CrucibleDispatcher.db_url = f"sqlite:///{tmp}/bench.db"
        c.CrucibleDispatcher.backend = "kubernetes"
        c.CrucibleKubernetesBackend.namespace = args.namespace
        c.CrucibleKubernetesBackend.kubeconfig = kubeconfig
        d = Dispatcher(config=c)
        await d.start()
        try:
            await through_crucible(d)
            await bare_job(batch, args.namespace)
            ours, ref = [], []
            for _ in range(args.runs):
                ref.append(await bare_job(batch, args.namespace))
                ours.append(await through_crucible(d))
            latencies = []
            for _ in range(6):
                latencies += await first_output(d)
            print(f"{'path':46} {'p50 s':>7} {'p95 s':>7}")
            print(
                f"{'bare Job print(1), watched (reference)':46} {pct(ref, 50):7.2f} {pct(ref, 95):7.2f}"
            )
            print(
                f"{'crucible print(1) submit -> finished':46} {pct(ours, 50):7.2f} {pct(ours, 95):7.2f}"
            )
            print(f"ratio of medians: {statistics.median(ours) / statistics.median(ref):.2f}x")
            print(
                f"first output, print in pod -> dispatcher subscriber: p50 {pct(latencies, 50):.0f} ms,"
                f" p95 {pct(latencies, 95):.0f} ms ({len(latencies)} prints)"
            )
        finally:
            await d.stop()
            await core.delete_namespace(args.namespace)
            await api.close()


if __name__ == "__main__":
    asyncio.run(main())
