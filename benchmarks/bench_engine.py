"""Engine latency and throughput on the local sandbox, beside a bare Python subprocess.

    .venv/bin/python benchmarks/bench_engine.py [--runs 200] [--clients 10] [--cells 200]

1. Latency: ``print(1)`` submitted → terminal status through the in-process dispatcher
   (bubblewrap sandbox, SQLite), with warm sandboxes (the default) and without, interleaved
   run by run with the reference: a bare ``python3 -c 'print(1)'`` subprocess started from
   the same event loop. Reports p50/p95 of each and the p50 overheads (goal: ≤ 25 ms).
2. Throughput: ``--cells`` trivial cells submitted by ``--clients`` concurrent clients.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

from traitlets.config import Config

from crucible_jupyter.dispatcher import Dispatcher


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


async def bare(python: str) -> float:
    """Milliseconds for a bare ``python -c 'print(1)'`` subprocess, output read."""
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        python, "-c", "print(1)", stdout=asyncio.subprocess.PIPE
    )
    await proc.communicate()
    return (time.perf_counter() - t0) * 1000


async def through_crucible(d: Dispatcher) -> float:
    """Milliseconds from submit to the terminal status of a ``print(1)`` cell."""
    t0 = time.perf_counter()
    execution = await d.submit({"code": "print(1)"})
    final = await d.wait(execution.id)
    assert final.status.value == "succeeded", final.reason
    return (time.perf_counter() - t0) * 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--cells", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dispatchers = {}
        for name, warm in (("warm", 2), ("cold", 0)):
            config = Config()
            config.CrucibleDispatcher.db_url = f"sqlite:///{tmp}/{name}.db"
            config.CrucibleLocalBackend.warm_sandboxes = warm
            dispatchers[name] = Dispatcher(config=config)
            await dispatchers[name].start()
        d = dispatchers["warm"]
        backend = d.get_backend("local")
        try:
            for _ in range(5):  # warm caches
                for x in dispatchers.values():
                    await through_crucible(x)
                await bare(sys.executable)
            ref: list[float] = []
            ours: dict[str, list[float]] = {name: [] for name in dispatchers}
            for _ in range(args.runs):
                ref.append(await bare(sys.executable))
                for name, x in dispatchers.items():
                    ours[name].append(await through_crucible(x))
            print(f"isolation: {backend.isolation}; cgroups: {backend.cgroup_layout[1]}")
            print(f"{'path':52} {'p50 ms':>8} {'p95 ms':>8}")
            print(
                f"{'bare python3 -c print(1) (reference)':52} {pct(ref, 50):8.1f} {pct(ref, 95):8.1f}"
            )
            for name, label in (
                ("warm", "crucible print(1) submit -> finished (default)"),
                ("cold", "same, warm_sandboxes=0 (sandbox started per cell)"),
            ):
                times = ours[name]
                print(f"{label:52} {pct(times, 50):8.1f} {pct(times, 95):8.1f}")
            for name in ours:
                overhead = [o - r for o, r in zip(ours[name], ref, strict=True)]
                print(
                    f"{name}: p50 overhead {statistics.median(overhead):+.1f} ms (ratio of"
                    f" medians {statistics.median(ours[name]) / statistics.median(ref):.2f}x)"
                )

            for name, x in dispatchers.items():
                queue: asyncio.Queue = asyncio.Queue()
                for _ in range(args.cells):
                    queue.put_nowait(None)

                async def client(x: Dispatcher = x, queue: asyncio.Queue = queue) -> None:
                    while not queue.empty():
                        queue.get_nowait()
                        await through_crucible(x)

                t0 = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(args.clients)))
                elapsed = time.perf_counter() - t0
                print(
                    f"throughput ({name}): {args.cells} cells from {args.clients} clients in"
                    f" {elapsed:.2f} s = {args.cells / elapsed:.1f} cells/s"
                    f" (max_concurrency={x.max_concurrency})"
                )
        finally:
            for x in dispatchers.values():
                await x.stop()


if __name__ == "__main__":
    asyncio.run(main())
