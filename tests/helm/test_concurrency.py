"""One set of values sizes the dispatcher, the ResourceQuota and the LimitRange together.

``executions.maxConcurrent`` is the dispatcher's ``max_concurrency`` and counts the
quota's pods; the cell sizes are the dispatcher's limits and the LimitRange's maximum.
The executor pods here are made by the Kubernetes backend the dispatcher creates, with
the settings the service reads from the rendered config file (``crucible serve
--config``), so the test fails if the chart and the code drift apart.
"""

from __future__ import annotations

import json
import math

import pytest

from crucible_jupyter.backends.kubernetes import objects
from crucible_jupyter.models import Resources

pytestmark = pytest.mark.helm

VALUES = {
    "executions.maxConcurrent": 7,
    "executions.maxConcurrentPerUser": 3,
    "executions.maxQueuedPerUser": 9,
    "executions.warmPods": 2,
    "executions.resourceQuota.extraPods": 1,
    "executions.cell.defaultCpu": 0.5,
    "executions.cell.maxCpu": 1.5,
    "executions.cell.defaultMemoryMiB": 300,
    "executions.cell.maxMemoryMiB": 1000,
    "executions.cell.outputLimitMiB": 5,
    "executions.isolationProbe": "10.0.0.1:6443",
}


@pytest.fixture(scope="module")
def rendered(helm):
    return helm.render(values=VALUES)


@pytest.fixture(scope="module")
def service(rendered, tmp_path_factory):
    """The real ``crucible serve`` application, initialised from the rendered config."""
    from crucible_jupyter.service.app import CrucibleService

    path = tmp_path_factory.mktemp("config") / "crucible_config.json"
    path.write_text(json.dumps(rendered.config()))
    app = CrucibleService()
    app.initialize(["--config", str(path)])
    return app


def test_the_service_reads_the_rendered_settings(service):
    dispatcher = service.dispatcher
    assert dispatcher.max_concurrency == 7
    assert dispatcher.max_concurrency_per_user == 3
    assert dispatcher.max_queued_per_user == 9
    assert dispatcher.backend == "kubernetes"
    assert dispatcher.enabled_backends == ["kubernetes"]
    assert dispatcher.default_cpu == 0.5
    assert dispatcher.max_cpu == 1.5
    assert dispatcher.default_memory == 300 << 20
    assert dispatcher.max_memory == 1000 << 20
    assert dispatcher.output_limit == 5 << 20
    assert service.prefix == "/services/crucible/"
    assert service.bind_url == "http://0.0.0.0:8576"
    backend = dispatcher.get_backend("kubernetes")
    assert backend.namespace == "crucible-executions"
    assert backend.create_namespace is False
    assert backend.warm_pods == 2
    assert backend.quota_policy == "wait"


def _pod_resources(service, cpu: float, memory: int) -> dict:
    backend = service.dispatcher.get_backend("kubernetes")
    labels = objects.labels("e", "u", backend.dispatcher_id)
    job = backend.make_job("crucible-e", labels, "img", Resources(cpu, memory), 60, {})
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container["resources"]


def _quantity(text: str) -> float:
    """CPU in cores ('1500m' -> 1.5) or bytes (plain integers, as the chart writes them)."""
    return int(text[:-1]) / 1000 if text.endswith("m") else int(text)


def test_quota_fits_max_concurrent_largest_cells_plus_warm_pods(rendered, service):
    hard = rendered.one("ResourceQuota")["spec"]["hard"]
    cells, warm = 7 + 1, 2  # maxConcurrent + extraPods, warmPods
    assert int(hard["pods"]) == cells + warm
    largest = _pod_resources(service, 1.5, 1000 << 20)
    default = _pod_resources(service, 0.5, 300 << 20)
    for key in ("requests", "limits"):
        for resource in ("cpu", "memory", "ephemeral-storage"):
            need = cells * _quantity(largest[key][resource]) + warm * _quantity(
                default[key][resource]
            )
            have = _quantity(hard[f"{key}.{resource}"])
            assert math.isclose(have, need), (key, resource, have, need)


def test_quota_refuses_one_cell_more(rendered, service):
    """The quota is a bound, not a formality: one more largest cell does not fit."""
    hard = rendered.one("ResourceQuota")["spec"]["hard"]
    largest = _pod_resources(service, 1.5, 1000 << 20)
    default = _pod_resources(service, 0.5, 300 << 20)
    used = 9 * _quantity(largest["limits"]["memory"]) + 2 * _quantity(default["limits"]["memory"])
    assert used > _quantity(hard["limits.memory"])


def test_limit_range_admits_the_largest_cell_and_no_more(rendered, service):
    (limits,) = rendered.one("LimitRange")["spec"]["limits"]
    largest = _pod_resources(service, 1.5, 1000 << 20)["limits"]
    for resource in ("cpu", "memory", "ephemeral-storage"):
        assert _quantity(largest[resource]) == _quantity(limits["max"][resource]), resource
    bigger = _pod_resources(service, 2.0, 1001 << 20)["limits"]
    assert _quantity(bigger["cpu"]) > _quantity(limits["max"]["cpu"])
    assert _quantity(bigger["memory"]) > _quantity(limits["max"]["memory"])


def test_quota_override_replaces_one_entry(helm):
    hard = helm.render(values={"executions.resourceQuota.hard.pods": "3"}).one("ResourceQuota")
    assert hard["spec"]["hard"]["pods"] == "3"
    assert "limits.memory" in hard["spec"]["hard"]


def test_server_config_passthrough_wins(helm):
    config = helm.render(values={"server.config.CrucibleDispatcher.aging_seconds": 5}).config()
    assert config["CrucibleDispatcher"]["aging_seconds"] == 5
    assert config["CrucibleDispatcher"]["max_concurrency"] == 10


def test_running_cells_are_handed_to_the_next_pod(helm):
    # the StatefulSet starts the next pod once this one is gone: cells running on Jobs are
    # left to it (followed to their end) rather than ended by the stopping pod
    assert helm.render().config()["CrucibleDispatcher"]["handover_on_stop"] is True
    off = {"server.config.CrucibleDispatcher.handover_on_stop": False}
    assert helm.render(values=off).config()["CrucibleDispatcher"]["handover_on_stop"] is False
