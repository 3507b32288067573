"""Every Kubernetes API call is bounded (``request_timeout``): against an API server that
accepts connections and never answers — a real socket, real HTTP — calls fail with a clear
error instead of hanging the cell, the warm pool or shutdown."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client

from crucible_jupyter.backends.kubernetes import objects
from crucible_jupyter.backends.kubernetes.cluster import Cluster
from crucible_jupyter.errors import Unavailable

#: Far above the request timeout: reaching it means the call was not bounded.
HANG = 30.0


async def with_hung_api_server(test) -> None:
    held: list[asyncio.StreamWriter] = []

    async def api_server_that_never_answers(reader, writer) -> None:
        held.append(writer)  # reads nothing, answers nothing, closes nothing

    server = await asyncio.start_server(api_server_that_never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    cluster = Cluster(namespace="ns", request_timeout=0.5, retry_timeout=0.0)
    cluster.api, cluster.core, cluster.batch = api, client.CoreV1Api(api), client.BatchV1Api(api)
    try:
        await asyncio.wait_for(test(cluster), HANG)
        assert held  # the calls did reach the server
    finally:
        for writer in held:
            writer.close()
        server.close()
        await api.close()


def test_a_call_to_a_hung_api_server_times_out():
    async def test(cluster: Cluster) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await cluster.patch_pod("pod", objects.state_patch("warm", "claimed"))

    asyncio.run(with_hung_api_server(test))


def test_creating_a_job_on_a_hung_api_server_fails_saying_how_to_fix_it():
    async def test(cluster: Cluster) -> None:
        job = objects.make_job(
            name="crucible-x", labels={}, image="img", python="python3", cpu=1,
            memory=1 << 29, timeout=60, env={},
        )  # fmt: skip
        configmap = objects.make_configmap("crucible-x", "print(1)", "# runner", {})
        with pytest.raises(Unavailable, match="request_timeout"):
            await cluster.create_job(job, configmap)

    asyncio.run(with_hung_api_server(test))


def test_opening_a_log_on_a_hung_api_server_fails_saying_how_to_fix_it():
    async def test(cluster: Cluster) -> None:
        with pytest.raises(Unavailable, match="request_timeout"):
            await cluster.open_log("pod", follow=True)

    asyncio.run(with_hung_api_server(test))
