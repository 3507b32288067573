"""Warm pods (``c.CrucibleKubernetesBackend.warm_pods``) on the real dev cluster.

Which pod ran a cell is observed, not inferred from timing: a cell prints its hostname (the
pod's name; warm pods belong to Jobs named ``crucible-warm-…``, cold ones to
``crucible-<execution id>``) and the execution records its isolation (``kubernetes+warm``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from crucible_jupyter.backends.kubernetes import objects
from crucible_jupyter.models import Execution, ExecutionRequest, Status, new_execution_id
from tests.helpers.engine import run_cell, stream_text
from tests.helpers.k8s import dispatcher_env, kubectl, run_and_kill_mid_cell, wait_until_job_deleted

pytestmark = pytest.mark.k8s

HOSTNAME = "import socket\nprint(socket.gethostname())"


async def warm(d, count: int = 1) -> list[str]:
    """Wait until ``count`` warm pods of ``d``'s pool can be claimed; their names."""
    backend = d.get_backend("kubernetes")
    for _ in range(900):  # a bound, not a timing assertion: warming is a cold pod start
        pods = backend._pool.warm_pods() if backend._pool else []  # (prepared in the background)
        if len(pods) >= count:
            return [p["metadata"]["name"] for p in pods]
        await asyncio.sleep(0.2)
    pytest.fail(f"no {count} warm pods: {backend._pool and backend._pool.report()}")


def warm_jobs(kube, namespace) -> list[dict]:
    """Warm pods' Jobs that are not being deleted."""
    jobs = kubectl(kube, "-n", namespace, "get", "jobs", "-l", objects.POOL_LABEL, "-o", "json")
    return [j for j in json.loads(jobs)["items"] if not j["metadata"].get("deletionTimestamp")]


async def test_a_cell_runs_on_a_warm_pod_and_the_pool_refills(k8s):
    d = await k8s(warm_pods=1)
    (before,) = await warm(d)
    code = HOSTNAME + "\nimport os\nprint(os.environ['CRUCIBLE_EXECUTION_ID'], os.environ['MINE'])"
    execution, events = await run_cell(d, code, env={"MINE": "yes"})
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert execution.isolation == "kubernetes+warm"
    host, ids = stream_text(events).splitlines()
    assert host == before  # the very pod that was warm
    assert ids == f"{execution.id} yes"
    assert objects.READY_LINE not in json.dumps([e.data for e in events])  # not the cell's
    (after,) = await warm(d)  # refilled with a new pod
    assert after != before
    second, events = await run_cell(d, HOSTNAME)
    assert second.isolation == "kubernetes+warm"
    assert stream_text(events) == after + "\n"


async def test_the_pool_serves_the_dispatchers_configured_defaults(k8s):
    # warm pods get what a request without resources gets here, not the library's defaults
    d = await k8s(warm_pods=1, dispatcher={"default_memory": 256 << 20, "default_cpu": 0.5})
    (pod,) = await warm(d)
    execution, events = await run_cell(d, HOSTNAME)
    assert execution.request.resources.memory == 256 << 20
    assert execution.isolation == "kubernetes+warm"
    assert stream_text(events) == pod + "\n"


async def test_requests_a_warm_pod_cannot_honour_take_the_cold_path(k8s):
    d = await k8s(warm_pods=1)
    (pod,) = await warm(d)
    for options in ({"memory": "256Mi"}, {"cpu": 0.5}, {"image": "ml"}):
        execution, events = await run_cell(d, HOSTNAME, **options)
        assert execution.status is Status.SUCCEEDED, (options, execution.reason)
        assert execution.isolation == "kubernetes", options
        assert stream_text(events).startswith(objects.job_name(execution.id)), options
    assert await warm(d) == [pod]  # still there, still warm


async def test_two_claims_never_get_the_same_pod(k8s):
    """Two dispatchers (each with its own pool and API connection) race for one warm pod
    on the API server; then twelve cells from both at once all run, each on its own pod."""
    d1 = await k8s(warm_pods=2)
    d2 = await k8s(warm_pods=2)
    target = (await warm(d1))[0]
    await warm(d2)
    pools = [d.get_backend("kubernetes")._pool for d in (d1, d2)]
    pod = next(p for p in pools[0].warm_pods() if p["metadata"]["name"] == target)
    executions = [
        Execution(id=new_execution_id(), request=ExecutionRequest(code="print(1)"), user="t")
        for _ in pools
    ]
    jobs = await asyncio.gather(
        *(p._claim(e, [pod]) for p, e in zip(pools, executions, strict=True))
    )
    assert len([j for j in jobs if j]) == 1, jobs  # exactly one claim won
    await d1.get_backend("kubernetes").cluster.delete(next(j for j in jobs if j), grace=0)
    await warm(d1, 2)
    await warm(d2, 2)
    submitted = [await d.submit({"code": HOSTNAME}) for _ in range(6) for d in (d1, d2)]
    finals = [await d1.wait(e.id) for e in submitted]
    assert [f.status for f in finals] == [Status.SUCCEEDED] * 12, [f.reason for f in finals]
    hosts = [stream_text(await d1.events(e.id)).strip() for e in submitted]
    assert len(set(hosts)) == 12, hosts
    assert any(f.isolation == "kubernetes+warm" for f in finals)


async def test_cancel_a_cell_on_a_warm_pod(k8s, kube, namespace):
    d = await k8s(warm_pods=1)
    (pod,) = await warm(d)
    execution = await d.submit({"code": "import time\nprint('up', flush=True)\ntime.sleep(600)"})
    async for event in d.subscribe(execution.id):
        if event.type == "stream":
            break
    final = await d.cancel(execution.id)
    assert final.status is Status.CANCELLED, final
    assert final.isolation == "kubernetes+warm"
    # the Job is deleted in the background: the cancel returns once the outcome is recorded
    await wait_until_job_deleted(kube, namespace, pod.rsplit("-", 1)[0])


async def test_timeout_and_out_of_memory_on_warm_pods(k8s):
    d = await k8s(warm_pods=1)
    await warm(d)
    execution, events = await run_cell(
        d, "import time\nprint('start', flush=True)\ntime.sleep(1000)", timeout=5
    )
    assert (execution.status, execution.isolation) == (Status.TIMED_OUT, "kubernetes+warm")
    assert stream_text(events) == "start\n"
    await warm(d)
    code = "x = []\nwhile True:\n    x.append(bytearray(32 << 20))"
    execution, _ = await run_cell(d, code, timeout=60)
    assert (execution.status, execution.isolation) == (Status.FAILED, "kubernetes+warm")
    assert execution.reason == "memory limit exceeded (512 MiB)", execution.reason


async def test_a_warm_pod_is_as_isolated_as_a_cold_one(k8s, kube):
    host_ip = kubectl(
        kube, "get", "nodes", "-o", "jsonpath={.items[0].status.addresses[0].address}"
    )
    code = textwrap.dedent(f"""
        import os, socket
        for port in (6443, 10250):
            try:
                socket.create_connection(({host_ip!r}, port), timeout=3).close()
                print(port, "OPEN")
            except OSError:
                print(port, "blocked")
        for path in ("/evil", "/usr/evil", "/opt/crucible/evil"):
            try:
                open(path, "w").write("x"); print("WROTE", path)
            except OSError:
                print("denied", path)
        print("token", os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"))
        print("uid", 1_000_000_000 <= os.getuid() == os.getgid() <= 1_000_065_535)
    """)
    d = await k8s(warm_pods=1)
    await warm(d)
    on_warm, warm_events = await run_cell(d, code, timeout=60)
    cold, cold_events = await run_cell(d, code, timeout=60, memory="256Mi")
    assert (on_warm.isolation, cold.isolation) == ("kubernetes+warm", "kubernetes")
    assert stream_text(warm_events) == stream_text(cold_events)
    out = stream_text(warm_events)
    assert out.count("blocked") == 2, out
    assert "OPEN" not in out, out
    assert out.count("denied") == 3, out
    assert "WROTE" not in out, out
    assert "token False" in out, out
    assert "uid True" in out, out


async def test_reattach_to_a_warm_pod_after_the_dispatcher_is_killed(
    k8s, kube, namespace, tmp_path
):
    url = f"sqlite:///{tmp_path}/restart.db"
    run_and_kill_mid_cell(dispatcher_env(kube, namespace, tmp_path, warm_pods=1), url, tmp_path)
    d = await k8s(db_url=url)
    (execution,) = (await d.list())[0]
    assert execution.isolation == "kubernetes+warm"  # the CLI's cell waited for its pool
    final = await d.wait(execution.id)
    assert final.status is Status.SUCCEEDED, final.reason
    assert stream_text(await d.events(execution.id)) == "".join(f"{i}\n" for i in range(8))
    seqs = [e.seq for e in await d.events(execution.id)]
    assert seqs == list(range(len(seqs)))


async def test_warm_pods_of_a_killed_dispatcher_are_swept(k8s, kube, namespace, tmp_path):
    script = textwrap.dedent(f"""
        import asyncio
        from traitlets.config import Config
        from crucible_jupyter.dispatcher import Dispatcher

        async def main():
            c = Config()
            c.CrucibleDispatcher.db_url = "sqlite:///{tmp_path}/dead.db"
            c.CrucibleDispatcher.backend = "kubernetes"
            c.CrucibleKubernetesBackend.warm_pods = 2
            d = Dispatcher(config=c)
            await d.start()
            await d.get_backend("kubernetes").prepare()
            while len(d.get_backend("kubernetes")._pool.warm_pods()) < 2:
                await asyncio.sleep(0.2)
            print("warm", flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
    """)
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=dispatcher_env(kube, namespace, tmp_path, warm_pods=2),
        start_new_session=True,
    ) as proc:
        assert proc.stdout.readline() == "warm\n"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(warm_jobs(kube, namespace)) >= 2  # left behind
    await k8s(db_url=f"sqlite:///{tmp_path}/sole.db", dispatcher={"single_dispatcher": True})
    assert warm_jobs(kube, namespace) == []


async def test_a_claim_that_hangs_falls_back_to_a_cold_job(k8s, monkeypatch):
    """A claim of a warm pod whose API call never ends left the cell waiting; every call is
    bounded (``request_timeout``) and the cell takes the cold path. The claim goes, over
    real HTTP, to a server that accepts the connection and never answers."""
    from kubernetes_asyncio import client

    d = await k8s(warm_pods=1)
    await warm(d)
    backend = d.get_backend("kubernetes")
    held: list[asyncio.StreamWriter] = []

    async def api_server_that_never_answers(reader, writer) -> None:
        held.append(writer)  # reads nothing, answers nothing, closes nothing

    server = await asyncio.start_server(api_server_that_never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    try:
        monkeypatch.setattr(backend.cluster, "request_timeout", 2.0)
        core = backend.cluster.core
        monkeypatch.setattr(
            core, "patch_namespaced_pod", client.CoreV1Api(hung).patch_namespaced_pod
        )
        execution, events = await run_cell(d, HOSTNAME, timeout=60)
        monkeypatch.undo()
    finally:
        for writer in held:
            writer.close()
        server.close()
        await hung.close()
    assert held  # the claim did reach the server that never answers
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert execution.isolation == "kubernetes"
    assert stream_text(events).startswith(objects.job_name(execution.id) + "-")
