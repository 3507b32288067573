"""Every scenario of the seed report, on our system and the real dev cluster."""

from __future__ import annotations

import asyncio
import json
import textwrap

import pytest

from crucible_jupyter.errors import InvalidRequest, UnsupportedLanguage
from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, statuses, stream_text
from tests.helpers.k8s import (
    dispatcher_env,
    kubectl,
    resource_quota,
    run_and_kill_mid_cell,
    wait_until_job_deleted,
)

pytestmark = pytest.mark.k8s


# ----- core flows ------------------------------------------------------------------------


async def test_lifecycle_output_and_storage_survive_the_job(k8s, kube, namespace):
    d = await k8s()
    execution, events = await run_cell(
        d, "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n6*7"
    )
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert execution.isolation.startswith("kubernetes")
    assert statuses(events) == ["queued", "starting", "running", "succeeded"]
    assert stream_text(events, "stdout") == "hello\n"
    assert stream_text(events, "stderr") == "oops\n"
    assert [e.data["data"]["text/plain"] for e in events if e.type == "execute_result"] == ["42"]
    # the Job is cleaned up, the record and its output stay
    await wait_until_job_deleted(kube, namespace, execution.id, fully=True)
    stored = await d.events(execution.id)
    assert stream_text(stored, "stdout") == "hello\n"


async def test_error_handling_and_language(k8s):
    d = await k8s()
    execution, events = await run_cell(d, "raise ValueError('bad value')")
    assert execution.status is Status.FAILED
    assert execution.reason == "ValueError: bad value"
    (error,) = [e for e in events if e.type == "error"]
    assert error.data["ename"] == "ValueError"
    with pytest.raises(UnsupportedLanguage, match="supported: python"):
        await d.submit({"code": "puts 1", "language": "ruby"})


async def test_timeout_ends_the_pod(k8s, kube, namespace):
    d = await k8s()
    execution, events = await run_cell(
        d, "import time\nprint('start', flush=True)\ntime.sleep(1000)", timeout=5
    )
    assert execution.status is Status.TIMED_OUT
    assert stream_text(events) == "start\n"


async def test_concurrent_executions(k8s):
    d = await k8s()
    executions = [await d.submit({"code": f"print({i})"}) for i in range(5)]
    finals = await asyncio.gather(*(d.wait(e.id) for e in executions))
    assert [f.status for f in finals] == [Status.SUCCEEDED] * 5
    for i, e in enumerate(executions):
        assert stream_text(await d.events(e.id)) == f"{i}\n"


# ----- fast-failing containers --------------------------------------------------------------


async def test_fast_failures_keep_logs_and_none_stuck(k8s):
    d = await k8s()
    cells = {
        "import sys; print('before exit'); sys.exit(3)": (Status.FAILED, 3, "before exit\n"),
        "import sys; print('out'); print('err', file=sys.stderr); sys.exit(1)": (
            Status.FAILED,
            1,
            "out\nerr\n",
        ),
        "import sys; sys.exit(0)": (Status.SUCCEEDED, 0, ""),
        "import os; print('bye', flush=True); os._exit(2)": (Status.FAILED, 2, "bye\n"),
    }
    executions = {code: await d.submit({"code": code}) for code in cells}
    for code, execution in executions.items():
        final = await d.wait(execution.id)
        status, exit_code, text = cells[code]
        assert (final.status, final.exit_code) == (status, exit_code), (code, final.reason)
        assert stream_text(await d.events(execution.id)) == text
    stuck, _ = await d.list(status=["queued", "starting", "running"])
    assert stuck == []


# ----- cancellation ---------------------------------------------------------------------------


async def test_cancel_running_deletes_the_job(k8s, kube, namespace):
    d = await k8s()
    execution = await d.submit({"code": "import time\nprint('up', flush=True)\ntime.sleep(600)"})
    async for event in d.subscribe(execution.id):
        if event.type == "stream":
            break
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    final = await d.cancel(execution.id)
    elapsed = loop.time() - t0
    assert final.status is Status.CANCELLED, final
    print(f"cancel recorded after {elapsed:.2f} s")
    await wait_until_job_deleted(kube, namespace, execution.id)


# ----- imports --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "ok", "expect"),
    [
        (
            "import json, datetime, math, sys, os\nprint(math.sqrt(16), json.dumps([1]))",
            True,
            "4.0 [1]\n",
        ),
        ("import definitely_not_installed", False, "ModuleNotFoundError"),
        ("def broken(:\n    pass", False, "SyntaxError"),
        ("from . import sibling", False, "ImportError"),
        (
            "from os.path import (\n    join,\n    basename as bn,\n)\nfrom math import *\nprint(bn(join('a', 'b')), floor(2.5))",
            True,
            "b 2\n",
        ),
        (
            "import subprocess\nprint(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout, end='')",
            True,
            "child\n",
        ),
    ],
)
async def test_import_handling(k8s, code, ok, expect):
    d = await k8s()
    execution, events = await run_cell(d, code)
    if ok:
        assert execution.status is Status.SUCCEEDED, execution.reason
        assert stream_text(events) == expect
    else:
        assert execution.status is Status.FAILED
        assert [e.data["ename"] for e in events if e.type == "error"] == [expect]


async def test_ml_image_has_numpy(k8s):
    d = await k8s()
    code = "import numpy as np\nprint(np.arange(4).sum(), np.__version__ > '1')"
    execution, events = await run_cell(d, code, image="ml")
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert stream_text(events) == "6 True\n"
    plain, plain_events = await run_cell(d, "import numpy")
    assert plain.status is Status.FAILED  # the default image is minimal


async def test_unknown_image_is_refused_and_missing_image_fails_fast(k8s):
    d = await k8s(
        images={
            "default": "localhost/crucible/executor:dev",
            "ghost": "localhost/crucible/does-not-exist:1",
        },
        pull_policy="Never",
    )
    with pytest.raises(InvalidRequest, match="is not allowed"):
        d.get_backend("kubernetes").image_for("anything")
    with pytest.raises(InvalidRequest, match="choose one of: default, ghost"):
        await d.submit({"code": "print(1)", "image": "anything"})  # refused before storing
    assert not [e for e in (await d.list(limit=50))[0] if e.request.image == "anything"]
    execution, _ = await run_cell(d, "print(1)", image="ghost", timeout=120)
    assert execution.status is Status.FAILED
    assert "image not found: localhost/crucible/does-not-exist:1" in execution.reason


# ----- isolation ------------------------------------------------------------------------------


async def test_network_isolation_is_enforced(k8s, kube, namespace):
    """The executor reaches neither the API server, the host, nor another pod; an
    unselected pod in the same namespace reaches that other pod (the control)."""
    server = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "target", "labels": {"role": "target"}},
        "spec": {
            "containers": [
                {
                    "name": "srv",
                    "image": "localhost/crucible/executor:dev",
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-m", "http.server", "8080"],
                }
            ]
        },
    }
    kubectl(kube, "-n", namespace, "apply", "-f", "-", input=json.dumps(server))
    kubectl(kube, "-n", namespace, "wait", "--for=condition=Ready", "pod/target", "--timeout=120s")
    target_ip = kubectl(
        kube, "-n", namespace, "get", "pod", "target", "-o", "jsonpath={.status.podIP}"
    )
    host_ip = kubectl(
        kube, "get", "nodes", "-o", "jsonpath={.items[0].status.addresses[0].address}"
    )
    probe = textwrap.dedent(f"""
        import socket
        for name, host, port in [("pod", {target_ip!r}, 8080), ("host", {host_ip!r}, 6443),
                                 ("api", {host_ip!r}, 10250)]:
            try:
                socket.create_connection((host, port), timeout=3).close()
                print(name, "OPEN")
            except OSError as e:
                print(name, "blocked")
    """)
    d = await k8s()
    execution, events = await run_cell(d, probe, timeout=60)
    out = stream_text(events, "stdout")
    assert "OPEN" not in out, out
    assert out.count("blocked") == 3
    control = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "control"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "c",
                    "image": "localhost/crucible/executor:dev",
                    "imagePullPolicy": "Never",
                    "command": [
                        "python3",
                        "-c",
                        f"import socket; socket.create_connection(({target_ip!r}, 8080), timeout=5); print('control OPEN')",
                    ],
                }
            ],
        },
    }
    kubectl(kube, "-n", namespace, "apply", "-f", "-", input=json.dumps(control))
    for _ in range(120):
        phase = kubectl(
            kube, "-n", namespace, "get", "pod", "control", "-o", "jsonpath={.status.phase}"
        )
        if phase in ("Succeeded", "Failed"):
            break
        await asyncio.sleep(0.5)
    assert phase == "Succeeded"
    assert "control OPEN" in kubectl(kube, "-n", namespace, "logs", "control")


async def test_filesystem_isolation(k8s):
    d = await k8s()
    code = textwrap.dedent("""
        import os
        for path in ("/evil", "/usr/evil", "/opt/crucible/evil"):
            try:
                open(path, "w").write("x"); print("WROTE", path)
            except OSError:
                print("denied")
        open("/tmp/fine", "w").write("ok")
        print("token", os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount"))
        print("uid", os.getuid())
        print("env", sorted(k for k in os.environ if k.endswith("_SERVICE_HOST")))
    """)
    execution, events = await run_cell(d, code)
    out = stream_text(events)
    assert "WROTE" not in out
    assert out.count("denied") == 3
    assert "token False" in out
    assert 1_000_000_000 <= int(out.split("uid ")[1].split()[0]) <= 1_000_065_535  # uid_range
    # no service links: only the API server's own address, which Kubernetes always injects
    assert "env []" in out or "env ['KUBERNETES_SERVICE_HOST']" in out


async def test_out_of_memory_is_reported(k8s):
    d = await k8s()
    code = "x = []\nwhile True:\n    x.append(bytearray(8 << 20))"
    execution, _ = await run_cell(d, code, memory="64Mi", timeout=60)
    assert execution.status is Status.FAILED
    assert execution.reason.startswith("memory limit exceeded"), execution.reason


async def test_resource_quota_refusal_is_a_clear_failure(k8s, kube, namespace):
    with resource_quota(kube, namespace, "small", {"limits.memory": "300Mi"}):
        d = await k8s()
        execution, _ = await run_cell(d, "print(1)", memory="1Gi", timeout=60)
        assert execution.status is Status.FAILED
        assert "resource quota exceeded" in execution.reason, execution.reason
        ok, events = await run_cell(d, "print('fits')", memory="128Mi")
        assert ok.status is Status.SUCCEEDED, ok.reason


@pytest.mark.slow
async def test_fifty_concurrent_executions_none_stuck(k8s):
    d = await k8s()
    executions = [
        await d.submit({"code": f"print('cell {i}')", "memory": "64Mi"}) for i in range(50)
    ]
    finals = await asyncio.gather(*(d.wait(e.id) for e in executions))
    assert [f.status for f in finals] == [Status.SUCCEEDED] * 50, [f.reason for f in finals]
    for i, e in enumerate(executions):
        assert stream_text(await d.events(e.id)) == f"cell {i}\n"


# ----- restart safety -------------------------------------------------------------------------


async def test_dispatcher_sigkilled_mid_run_resumes_with_complete_output(
    k8s, kube, namespace, tmp_path
):
    url = f"sqlite:///{tmp_path}/restart.db"
    run_and_kill_mid_cell(dispatcher_env(kube, namespace, tmp_path, warm_pods=0), url, tmp_path)
    d = await k8s(db_url=url)
    page, _ = await d.list()
    (execution,) = page
    final = await d.wait(execution.id)
    assert final.status is Status.SUCCEEDED, final.reason
    assert stream_text(await d.events(execution.id)) == "".join(f"{i}\n" for i in range(8))
    seqs = [e.seq for e in await d.events(execution.id)]
    assert seqs == list(range(len(seqs)))
    await wait_until_job_deleted(kube, namespace, execution.id)


def test_doctor_reports_enforced_network_isolation(kube, namespace, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "KUBECONFIG": kube.kubeconfig, "CRUCIBLE_K8S_NAMESPACE": namespace}
    done = subprocess.run(
        [sys.executable, "-m", "crucible_jupyter.cli", "--db-url", f"sqlite:///{tmp_path}/d.db",
         "doctor", "--backend", "kubernetes", "--json"],
        capture_output=True, text=True, env=env, timeout=180,
    )  # fmt: skip
    report = json.loads(done.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["kubernetes"]["ok"], checks
    assert checks["network isolation"]["ok"], checks["network isolation"]
    assert checks["network isolation"]["detail"].startswith("enforced")
    assert checks["process limit"]["ok"], checks["process limit"]
    stopped_at = int(checks["process limit"]["detail"].split(" stops at ")[1].split()[0])
    assert 1000 < stopped_at < 1024  # podPidsLimit 1024 of dev/cluster, minus the pod's own
    assert checks["warm pods"]["ok"], checks["warm pods"]  # the pool is reported
    assert checks["warm pods"]["detail"].startswith("warm_pods = 1; in namespace")
    assert done.returncode == 0


async def test_sole_dispatcher_deletes_orphaned_jobs(k8s, kube, namespace, tmp_path):
    from crucible_jupyter.backends.kubernetes import objects

    orphan_id = "01a20000-0000-7000-8000-000000000001"
    name = objects.job_name(orphan_id)
    job = objects.make_job(
        name=name, labels=objects.labels(orphan_id, "ghost", "dead-dispatcher"),
        image="localhost/crucible/executor:dev", python="python3", cpu=0.1, memory=64 << 20,
        timeout=600, env={},
    )  # fmt: skip
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["sleep", "600"]
    job["spec"]["template"]["spec"]["volumes"] = job["spec"]["template"]["spec"]["volumes"][1:]
    job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "tmp", "mountPath": "/tmp"}
    ]
    kubectl(kube, "-n", namespace, "apply", "-f", "-", input=json.dumps(job))
    await k8s(db_url=f"sqlite:///{tmp_path}/sole.db", dispatcher={"single_dispatcher": True})
    jobs = json.loads(kubectl(kube, "-n", namespace, "get", "jobs", "-o", "json"))["items"]
    assert not [j for j in jobs if j["metadata"]["name"] == name
                and not j["metadata"].get("deletionTimestamp")]  # fmt: skip
