"""Run each execution as a Kubernetes Job, event-driven (one shared pod watch, no polling).

Warm pods (``warm_pods``, see ``warm.py``): executor pods started ahead, each waiting for
one cell on stdin; a request that fits one runs there instead of in a new Job.

Output: the runner writes NDJSON frames to its stdout; the pod's log is followed while it
runs and every frame is handed to the dispatcher (and so to storage) as it arrives, so
output survives the pod's deletion. A pod that ends before its log is opened loses
nothing: the log of a terminated container is read whole.

Outcomes come from the pod status: exit code; OOMKilled → "memory limit exceeded";
eviction; an image that cannot be pulled fails fast with its reason; a pod unschedulable
past ``unschedulable_timeout`` fails with the scheduler's message; a quota refusal fails
with a clear reason, or waits, as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Integer, List, TraitError, Unicode, default, validate

from ...errors import CrucibleError, InvalidRequest, RequestTooLarge, Unavailable
from ...models import (
    Execution,
    ExecutionRequest,
    Resources,
    format_bytes,
    new_execution_id,
)
from ..base import FRAMES, Backend, Check, Outcome, Sandbox, read_lines
from . import objects, probes
from .api import raw, raw_json
from .reflector import Pod, PodReflector
from .warm import WarmPool, fits, job_of, state_of

RUNNER = Path(__file__).resolve().parent.parent.parent / "runner.py"
READY = objects.READY_LINE.encode()
ENDED = object()  # the container ended while its log was followed
#: The runner's last frame (as its FrameWriter writes it: keys in this order).
END_FRAME = re.compile(rb'\{"v":1,"seq":\d+,"t":\d+,"type":"end"')
#: Threads the doctor probe tries to start; a pod that stops short of it has a process limit.
PIDS_PROBE = 1500
IMAGE_FAILURES = {
    "ErrImagePull": "image could not be pulled",
    "ImagePullBackOff": "image could not be pulled",
    "ErrImageNeverPull": "image not found",
    "InvalidImageName": "invalid image name",
    "CreateContainerConfigError": "container configuration error",
    "CreateContainerError": "container could not be created",
    "RunContainerError": "container could not be started",
}


class CrucibleKubernetesBackend(Backend):
    """Runs each execution as a hardened Kubernetes Job in one namespace."""

    name = "kubernetes"

    namespace = Unicode(
        help="Namespace where execution Jobs run (env CRUCIBLE_K8S_NAMESPACE).",
    ).tag(config=True)

    @default("namespace")
    def _default_namespace(self) -> str:
        return os.environ.get("CRUCIBLE_K8S_NAMESPACE", "crucible-executions")

    kubeconfig = Unicode(
        help="""kubeconfig file to use; empty: in-cluster configuration when running in a
        pod, else $KUBECONFIG or ~/.kube/config.""",
    ).tag(config=True)

    @default("kubeconfig")
    def _default_kubeconfig(self) -> str:
        return os.environ.get("KUBECONFIG", "")

    images = Dict(
        Unicode(),
        default_value={
            "default": "localhost/crucible/executor:dev",
            "ml": "localhost/crucible/executor-ml:dev",
        },
        help="""Allowed images by short name; a request's `image` must be one of these
        names (or one of the image references). `default` is used when none is given.""",
    ).tag(config=True)

    python = Unicode("python3", help="Python command inside the executor images.").tag(config=True)
    runtime_class = Unicode(
        "", help="runtimeClassName of executor pods (e.g. gvisor in production)."
    ).tag(config=True)
    pull_policy = Enum(
        ["IfNotPresent", "Never", "Always"], "IfNotPresent", help="imagePullPolicy of executors."
    ).tag(config=True)
    uid_range = List(
        Integer(min=1, max=2147483647),
        default_value=[1_000_000_000, 1_000_065_535],
        minlen=0,
        maxlen=2,
        help="""[first, last]: each executor pod (cold or warm) runs as a user and group of
        its own from this range, one no other executor pod in the namespace runs as. The
        kernel limits some resources per user (inotify instances, POSIX message queues,
        RLIMIT_NPROC): shared, one cell could exhaust them for all. Use a range no other
        workload on the nodes runs as (the default is far above host users, subordinate
        uids and Kubernetes' user namespaces). Images need no passwd entry for it (HOME is
        /tmp). Empty: every pod runs as run_as_uid (one shared user).""",
    ).tag(config=True)
    run_as_uid = Integer(
        65534, help="UID of every executor pod when uid_range is empty (shared by all)."
    ).tag(config=True)
    seccomp_profile = Unicode(
        "profiles/crucible-executor.json",
        help="""Localhost seccomp profile of executor pods, relative to the kubelet's
        seccomp directory (<kubelet root-dir>/seccomp) on every node: install
        crucible_jupyter/backends/kubernetes/seccomp-executor.json there under this name
        (the dev cluster does). It is the runtime's default profile without io_uring,
        ptrace and process_vm_*, with sockets of the UNIX, IP and netlink-route families
        only (no vsock). A node without the file cannot start executors ("container could
        not be created"). Empty: the runtime's default (RuntimeDefault).""",
    ).tag(config=True)
    ephemeral_storage = Integer(
        0,
        help="""Node disk (ephemeral-storage, bytes) an executor pod may use, limit and
        request: its log is on the node's disk. 0: twice the dispatcher's output_limit
        plus 20 MiB (the runner writes no more output than output_limit, plus 2 MiB of
        errors). The kubelet evicts a pod past it.""",
    ).tag(config=True)
    tmp_size = Integer(256 << 20, help="Size limit of the emptyDir /tmp, in bytes.").tag(
        config=True
    )
    max_file_size = Integer(256 << 20, help="Largest file a cell may write (RLIMIT_FSIZE).").tag(
        config=True
    )
    ttl_seconds_after_finished = Integer(
        300, help="Backstop: Kubernetes deletes finished Jobs after this many seconds."
    ).tag(config=True)
    deadline_padding = Integer(
        15, help="activeDeadlineSeconds = the request's timeout + this (a backstop)."
    ).tag(config=True)
    unschedulable_timeout = Float(
        60.0, help="Seconds a pod may stay unschedulable before the execution fails."
    ).tag(config=True)
    quota_policy = Enum(
        ["fail", "wait"],
        "fail",
        help="""When a ResourceQuota refuses the pod: `fail` at once with the quota's
        message, or `wait` (retrying) until it fits or the timeout ends.""",
    ).tag(config=True)
    isolation_probe = Unicode(
        help="""HOST:PORT[,HOST:PORT...] (IPv6 as [ADDR]:PORT) an executor must be unable
        to reach before its cell runs (the NetworkPolicy takes effect a moment after the pod
        starts); the runner also probes the node it runs on (IPv4 gateway, IPv6 link-local)
        on these ports. Default: every address of the API server (IPv4 and IPv6, from its
        EndpointSlices). `off` disables the wait.""",
    ).tag(config=True)

    create_namespace = Bool(
        True, help="Create the namespace when it is missing (needs the permission to)."
    ).tag(config=True)
    max_line_bytes = Integer(16 << 20, help="Longest single frame accepted from a pod.").tag(
        config=True
    )
    warm_pods = Integer(
        1,
        help="""Executor pods kept started ahead, each isolated and waiting for one cell
        (0: a Job per cell). A cell with the default image and resources (the dispatcher's
        default_cpu and default_memory) runs on one, its output showing in about a tenth of
        a cold Job's time; the pool refills in the background (a cold start, ~2 s).
        Default 1: a notebook runs its cells one after another, so one warm pod serves each
        next cell, while every warm pod holds its requests (at most 0.25 CPU, and
        default_memory) on a node while it waits. Raise it for many users or bursts.""",
    ).tag(config=True)
    warm_pod_lifetime = Integer(
        3600,
        help="""Seconds a warm pod may wait for a cell; then it ends and a fresh one
        replaces it. Also what bounds the warm pods of a dispatcher that died.""",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api = None
        self._core = None
        self._batch = None
        self._reflector: PodReflector | None = None
        self._setup_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._api_endpoint: str | None = None
        self._pool: WarmPool | None = None
        self._ws: Any = None
        self._runner_source = RUNNER.read_text()
        self._picked: dict[int, float] = {}  # uids picked lately -> when (see _pick_uid)
        self.dispatcher_id = objects.label_value(getattr(self.parent, "owner", "crucible"))

    # ----- connection ----------------------------------------------------------------

    async def _connect(self) -> None:
        async with self._setup_lock:
            if self._core is not None:
                return
            from kubernetes_asyncio import client, config

            try:
                if not self.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
                    config.load_incluster_config()
                    api = client.ApiClient()
                else:
                    api = await config.new_client_from_config(config_file=self.kubeconfig or None)
            except Exception as e:
                raise Unavailable(
                    f"cannot load Kubernetes configuration ({e}); set"
                    " c.CrucibleKubernetesBackend.kubeconfig or KUBECONFIG"
                ) from e
            self._api = api
            self._core = client.CoreV1Api(api)
            self._batch = client.BatchV1Api(api)
            self._networking = client.NetworkingV1Api(api)
            await self._ensure_network_policy()
            self._api_endpoint = await self._find_api_endpoint()
            self._reflector = PodReflector(
                self._core, self.namespace, f"{objects.APP_LABEL}={objects.APP}", log=self.log
            )
            try:
                await asyncio.wait_for(self._reflector.start(), 30)
            except Exception as e:
                await self.close()
                raise Unavailable(f"cannot watch pods in namespace {self.namespace!r}: {e}") from e

    async def _ensure_network_policy(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        if self.create_namespace:
            try:
                await self._core.create_namespace({"metadata": {"name": self.namespace}})
                self.log.info("crucible: created namespace %s", self.namespace)
            except ApiException as e:
                if e.status not in (403, 409):  # exists, or not ours to create
                    msg = f"cannot create namespace {self.namespace!r}: {e.reason}"
                    raise Unavailable(msg) from e
        body = objects.make_network_policy()
        try:
            await self._networking.create_namespaced_network_policy(self.namespace, body)
        except ApiException as e:
            if e.status == 409:
                return
            if e.status == 404:
                raise Unavailable(
                    f"namespace {self.namespace!r} does not exist; create it or set"
                    " c.CrucibleKubernetesBackend.namespace"
                ) from e
            raise Unavailable(f"cannot ensure the deny-all NetworkPolicy: {e.reason}") from e

    async def prepare(self) -> None:
        """Connect, and start the warm pods (``warm_pods``) in the background."""
        await self._connect()
        if self._pool is None and self.warm_pods > 0:
            self._pool = WarmPool(self, self.warm_pods)
            self._pool.start()

    def _ws_api(self) -> Any:
        """The websocket API client (pod attach), created on first use."""
        if self._ws is None:
            from kubernetes_asyncio.stream import WsApiClient

            self._ws = WsApiClient(configuration=self._api.configuration)
        return self._ws

    async def close(self) -> None:
        """Retire the warm pods no cell claimed, stop the pod watch, close the API."""
        if self._pool is not None:
            with contextlib.suppress(Exception):  # bounded: a hung API call must not
                await asyncio.wait_for(self._pool.stop(), 30)  # keep the dispatcher up
            self._pool = None
        if self._background:  # deletions under way
            await asyncio.wait(set(self._background), timeout=10)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 10)
            self._ws = None
        if self._reflector is not None:
            await self._reflector.stop()
            self._reflector = None
        if self._api is not None:
            await self._api.close()
            # TLS connections finish closing on the next loop iterations (aiohttp's
            # documented graceful shutdown); without this their sockets leak at loop close
            await asyncio.sleep(0.25)
            self._api = None
            self._core = None

    # ----- starting ------------------------------------------------------------------

    def image_for(self, requested: str | None) -> str:
        """The image reference for a request's ``image`` (a short name or an allowed ref)."""
        if not requested:
            return self.images.get("default") or next(iter(self.images.values()))
        if requested in self.images:
            return self.images[requested]
        if requested in self.images.values():
            return requested
        raise InvalidRequest(
            f"image {requested!r} is not allowed; choose one of: {', '.join(sorted(self.images))}",
            field="image",
        )

    def admit(self, request: ExecutionRequest) -> None:
        """Refuse, before the request is stored, an image that is not one of :attr:`images`,
        a cell larger than :meth:`max_code_bytes` (413), and any request when there is no
        Kubernetes configuration to reach a cluster with."""
        self.image_for(request.image)
        size, room = len(request.code.encode("utf-8")), self.max_code_bytes()
        if size > room:
            raise RequestTooLarge(
                f"'code' is {size:,} bytes, over the kubernetes backend's limit of {room:,}"
                f" bytes ({format_bytes(room)}: a cell travels to its pod in a ConfigMap, at"
                " most 1 MiB with the runner); load large data from a file instead of pasting"
                " it into the cell",
                field="code",
            )
        problem = self.configuration_problem()
        if problem:  # a 400 like any backend not configured here: retrying will not help
            raise InvalidRequest(
                f"the kubernetes backend cannot be used here: {problem}. Set"
                " c.CrucibleKubernetesBackend.kubeconfig (or KUBECONFIG) on the server, or"
                " run on backend 'local'",
                field="backend",
            )

    def max_code_bytes(self) -> int:
        """The largest cell (UTF-8 bytes) this backend can run: what fits in its ConfigMap
        beside the runner (Kubernetes refuses a ConfigMap over 1 MiB)."""
        return objects.configmap_room(self._runner_source)

    def configuration_problem(self) -> str | None:
        """Why no cluster can be reached from here (no configuration at all), else None."""
        if self.kubeconfig:
            files = [f for f in self.kubeconfig.split(os.pathsep) if f]
            if any(os.path.exists(f) for f in files):
                return None
            return f"the kubeconfig {self.kubeconfig!r} does not exist"
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            return None  # in a pod: the service account
        if os.path.exists(os.path.expanduser("~/.kube/config")):
            return None
        return "no Kubernetes configuration (not in a pod, KUBECONFIG unset, no ~/.kube/config)"

    def make_job(
        self, name: str, labels: dict, image: str, resources: Resources, timeout: float,
        env: dict[str, str], warm: bool = False,
    ) -> dict:  # fmt: skip
        """The Job of one execution (or of one warm pod) with this backend's settings."""
        return objects.make_job(
            name=name,
            labels=labels,
            image=image,
            python=self.python,
            cpu=resources.cpu,
            memory=resources.memory,
            timeout=timeout,
            env={
                # the pod's uid has no passwd entry (see uid_range): getpass.getuser(), which
                # some libraries call for cache folders, reads these first
                "USER": "crucible",
                "LOGNAME": "crucible",
                **env,
                "HOME": "/tmp",
                "MPLCONFIGDIR": "/tmp/.matplotlib",
                "PYTHONDONTWRITEBYTECODE": "1",
            },
            uid=self._pick_uid(),
            seccomp_profile=self.seccomp_profile or None,
            output_limit=self._output_limit(),
            ephemeral_storage=self.ephemeral_storage
            or objects.ephemeral_storage_for(self._output_limit() or 10 << 20),
            tmp_size=self.tmp_size,
            max_file_size=self.max_file_size,
            deadline_padding=self.deadline_padding,
            ttl_seconds=self.ttl_seconds_after_finished,
            runtime_class=self.runtime_class or None,
            pull_policy=self.pull_policy,
            await_isolation=self._isolation_probe(),
            warm=warm,
        )

    def _output_limit(self) -> int | None:
        """The dispatcher's output limit (the runner writes no more output than that)."""
        limit = getattr(self.parent, "output_limit", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    def _pick_uid(self) -> int:
        """A uid from :attr:`uid_range` that no executor pod in the namespace runs as, nor
        one this backend picked in the last minutes (its pod may not be watched yet)."""
        if not self.uid_range:
            return self.run_as_uid
        first, last = self.uid_range
        now = time.monotonic()
        self._picked = {u: t for u, t in self._picked.items() if now - t < 300}
        used = set(self._picked)
        for pod in self._reflector.pods.values() if self._reflector else ():
            context = (pod.get("spec") or {}).get("securityContext") or {}
            used.add(context.get("runAsUser"))
        uid = first
        for _ in range(100):  # random: two dispatchers sharing a namespace rarely collide
            uid = first + secrets.randbelow(last - first + 1)
            if uid not in used:
                break
        self._picked[uid] = now
        return uid

    @validate("uid_range")
    def _valid_uid_range(self, proposal: Any) -> list[int]:
        value = proposal["value"]
        if len(value) == 1 or (len(value) == 2 and value[0] > value[1]):
            raise TraitError(f"uid_range must be [first, last] with first <= last, or []: {value}")
        return value

    async def create_job(self, name: str, code: str, job: dict) -> dict:
        """Create the ConfigMap (runner and ``code``) and the Job; the Job as created."""
        from kubernetes_asyncio.client.exceptions import ApiException

        labels = job["metadata"]["labels"]
        configmap = objects.make_configmap(name, code, self._runner_source, labels)
        # a cell near max_code_bytes() makes a request body over 1 MiB (1.4 MB at most),
        # which aiohttp warns about (it writes it in one go): expected here, not a problem
        warnings.filterwarnings("ignore", "Sending a large body directly", ResourceWarning)
        try:
            await _retry(lambda: self._core.create_namespaced_config_map(self.namespace, configmap))
            created = await _retry(
                lambda: raw_json(
                    self._batch.create_namespaced_job(self.namespace, job, _preload_content=False)
                )
            )
        except ApiException as e:
            with contextlib.suppress(Exception):
                await self._core.delete_namespaced_config_map(name, self.namespace)
            raise Unavailable(f"Kubernetes refused the Job: {_api_message(e)}") from e
        # the ConfigMap goes when the Job goes; not waited for: the pod does not need it
        self.later(self._own_configmap(name, created))
        return created

    def later(self, coro: Any) -> None:
        """Run an API call in the background (``close`` waits for it); a failure is logged,
        never left as an unretrieved task exception."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("crucible: a background Kubernetes call failed: %s", task.exception())

    async def start(self, execution: Execution) -> Sandbox:
        """Hand the execution to a warm pod if one can run it, else create its ConfigMap
        and Job; return a sandbox following its pod."""
        image = self.image_for(execution.request.image)
        if fits(self, execution.request):
            await self.prepare()  # (the dispatcher's own call may still be connecting)
        else:
            await self._connect()
        isolation = "kubernetes" + (f"/{self.runtime_class}" if self.runtime_class else "")
        if self._pool is not None and (name := await self._pool.run(execution)):
            return KubernetesSandbox(self, execution, name, isolation=f"{isolation}+warm")
        req = execution.request
        name = objects.job_name(execution.id)
        labels = objects.labels(execution.id, execution.user, self.dispatcher_id)
        job = self.make_job(
            name, labels, image, req.resources, req.timeout,
            {**req.env, "CRUCIBLE_EXECUTION_ID": execution.id},
        )  # fmt: skip
        await self.create_job(name, req.code, job)
        return KubernetesSandbox(self, execution, name, isolation=isolation)

    async def reattach(self, execution: Execution) -> Sandbox | None:
        """Follow the Job of an execution a dead dispatcher started, if it still exists."""
        from kubernetes_asyncio.client.exceptions import ApiException

        await self._connect()
        name = objects.job_name(execution.id)
        try:
            await self._batch.read_namespaced_job(name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            # a warm pod claimed for it? (found by the execution's label, like any pod)
            pod = self._reflector.pod_for(objects.label_value(execution.id))
            if pod is None or not job_of(pod):
                return None
            name = job_of(pod)
        isolation = execution.isolation or "kubernetes"
        return KubernetesSandbox(self, execution, name, isolation=isolation)

    def _isolation_probe(self) -> str | None:
        if self.isolation_probe == "off":
            return None
        return self.isolation_probe or self._api_endpoint

    async def _find_api_endpoint(self) -> str | None:
        """Every address of the API server as pods see it, IPv4 and IPv6 (the `kubernetes`
        EndpointSlices, else its Endpoints), as ``HOST:PORT,[V6]:PORT``."""
        from kubernetes_asyncio import client

        found: list[str] = []
        problems = []
        try:
            slices = await raw_json(
                client.DiscoveryV1Api(self._api).list_namespaced_endpoint_slice(
                    "default",
                    label_selector="kubernetes.io/service-name=kubernetes",
                    _preload_content=False,
                )
            )
            for item in slices.get("items", []):
                ports = [p["port"] for p in item.get("ports") or [] if p.get("port")]
                for endpoint in item.get("endpoints") or []:
                    found += [(a, p) for a in endpoint.get("addresses", []) for p in ports]
        except Exception as e:
            problems.append(f"EndpointSlices: {e}")
        try:
            endpoints = await raw_json(
                self._core.read_namespaced_endpoints(
                    "kubernetes", "default", _preload_content=False
                )
            )
            for subset in endpoints.get("subsets") or []:
                ports = [p["port"] for p in subset.get("ports") or []]
                found += [(a["ip"], p) for a in subset.get("addresses") or [] for p in ports]
        except Exception as e:
            problems.append(f"Endpoints: {e}")
        targets = sorted({f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in found})
        if not targets:
            self.log.warning(
                "crucible: cannot find the API server's address for the isolation probe (%s);"
                " set c.CrucibleKubernetesBackend.isolation_probe",
                "; ".join(problems) or "no addresses",
            )
        return ",".join(targets) or None

    async def sweep(self, live: set[str]) -> int:
        """Delete executor Jobs whose execution is not live here (orphans of a crash)."""
        await self._connect()
        jobs = await raw_json(self._batch.list_namespaced_job(
            self.namespace, label_selector=f"{objects.APP_LABEL}={objects.APP}",
            _preload_content=False,
        ))  # fmt: skip
        keep = {objects.label_value(i) for i in live}
        pods = {job_of(p): p for p in self._reflector.pods.values() if job_of(p)}
        mine = self._pool._jobs if self._pool is not None else set()
        orphans = [
            job["metadata"]["name"]
            for job in jobs.get("items", [])
            if job["metadata"]["name"] not in mine
            and self._job_execution(job, pods.get(job["metadata"]["name"])) not in keep
        ]
        for name in orphans:
            self.log.warning("crucible: deleting orphaned Job %s", name)
            await self.delete(name, grace=0)
        return len(orphans)

    def _job_execution(self, job: dict, pod: Pod | None) -> str | None:
        """The execution label a Job runs for; None for a warm pod no cell claimed (an
        orphan unless this dispatcher's pool started it)."""
        labels = job["metadata"].get("labels") or {}
        if objects.POOL_LABEL not in labels:
            return labels.get(objects.EXECUTION_LABEL)
        for found in (pod, job):  # the pod is claimed first; its Job is labelled next
            if state_of(found) == "claimed":
                return (found["metadata"].get("labels") or {}).get(objects.EXECUTION_LABEL)
        return None

    async def _own_configmap(self, name: str, job: dict) -> None:
        with contextlib.suppress(Exception):
            await self._core.patch_namespaced_config_map(
                name,
                self.namespace,
                {"metadata": {"ownerReferences": [objects.owner_reference(job)]}},
            )

    async def delete(self, name: str, grace: int | None = None) -> None:
        """Delete a Job (and its pods, in the background) and its ConfigMap, both at once;
        a gone Job is not an error."""
        from kubernetes_asyncio.client.exceptions import ApiException

        async def quietly(call) -> None:
            with contextlib.suppress(ApiException):
                await call

        await asyncio.gather(
            quietly(self._batch.delete_namespaced_job(
                name, self.namespace, propagation_policy="Background", grace_period_seconds=grace
            )),
            quietly(self._core.delete_namespaced_config_map(name, self.namespace)),
        )  # fmt: skip

    async def delete_pods(self, execution_id: str, grace: int) -> None:
        """Delete the pods of an execution with a grace period (SIGTERM, then SIGKILL)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            await self._core.delete_collection_namespaced_pod(
                self.namespace,
                grace_period_seconds=grace,
                label_selector=f"{objects.EXECUTION_LABEL}={objects.label_value(execution_id)}",
            )

    # ----- health --------------------------------------------------------------------

    async def checks(self) -> list[Check]:
        """Cluster reachable, namespace usable, NetworkPolicy present."""
        out = []
        try:
            await self._connect()
            out.append(Check("kubernetes", True, f"API reachable; namespace {self.namespace!r}"))
        except CrucibleError as e:
            return [
                Check(
                    "kubernetes",
                    False,
                    e.message,
                    fix="start the cluster (dev/cluster/cluster up) and set KUBECONFIG",
                )
            ]
        try:
            await self._networking.read_namespaced_network_policy(
                objects.POLICY_NAME, self.namespace
            )
            out.append(Check("network policy", True, f"{objects.POLICY_NAME} present"))
        except Exception as e:
            out.append(Check("network policy", False, f"deny-all policy missing: {e}"))
        out.append(self._pool_check())
        out.append(self._seccomp_check())
        out.extend(await self._probe_executor())
        return out

    def _seccomp_check(self) -> Check:
        """Which seccomp profile executors run (the probe below starts one with it)."""
        if self.seccomp_profile:
            return Check(
                "seccomp profile",
                True,
                f"executors run Localhost profile {self.seccomp_profile!r} (io_uring, ptrace,"
                " vsock and other socket families refused)",
                fix="if executors cannot be created, install"
                " crucible_jupyter/backends/kubernetes/seccomp-executor.json on every node as"
                f" <kubelet root-dir>/seccomp/{self.seccomp_profile}",
            )
        return Check(
            "seccomp profile",
            False,
            "executors run the runtime's default profile (RuntimeDefault), which allows"
            " io_uring (and vsock in containerd 1.6)",
            fix="install crucible's profile on the nodes and set"
            " c.CrucibleKubernetesBackend.seccomp_profile (see the README)",
            severity="warning",
        )

    def _pool_check(self) -> Check:
        """The warm pods: configured, and those in the namespace (warm, starting, busy)."""
        pool = self._pool or WarmPool(self, self.warm_pods)
        problem = pool.problem
        detail = pool.report() + (f"; the last did not become warm: {problem}" if problem else "")
        if self.warm_pods <= 0:
            detail += "; every cell starts a Job"
        return Check(
            "warm pods",
            problem is None,
            detail,
            fix="see the warm pod's log: kubectl -n NAMESPACE logs -l crucible.jupyter.org/pool",
            severity="warning",
        )

    async def _probe_executor(self) -> list[Check]:
        """Run real executors (see ``probes.py``): a listener, and a prober that tries to
        reach the API server, the node (IPv4, IPv6), the listener (IPv4, IPv6, multicast,
        broadcast) and node ports, and counts the threads it can start (does the kubelet
        set podPidsLimit?)."""
        target = self._isolation_probe() or self._api_endpoint  # (probed even when "off")
        if not target:
            return [
                Check(
                    "network isolation",
                    False,
                    "no address to probe (API server unknown, or isolation_probe = 'off')",
                    fix="set c.CrucibleKubernetesBackend.isolation_probe = 'HOST:PORT'",
                )
            ]
        resources = Resources(0.2, 256 << 20)
        listener = Execution(
            id=new_execution_id(),
            request=ExecutionRequest(code=probes.listener_code(90), timeout=120,
                                     resources=resources),
            user="crucible-doctor",
        )  # fmt: skip
        lines: list[bytes] = []
        listening = asyncio.Event()

        async def follow(sandbox: Sandbox) -> None:
            async for _, line, _ in sandbox.lines():
                lines.append(line)
                if b"LISTENING" in line:
                    listening.set()

        try:
            sandbox = await self.start(listener)
        except CrucibleError as e:
            return [Check("network isolation", False, f"probe could not run: {e.message}")]
        following = asyncio.ensure_future(follow(sandbox))
        try:
            await asyncio.wait(
                {following, asyncio.ensure_future(listening.wait())},
                timeout=90,
                return_when=asyncio.FIRST_COMPLETED,
            )
            text = b"\n".join(lines).decode("utf-8", "replace")
            peer = probes.find_json(text, "LISTENING")
            if peer is None:
                outcome = await sandbox.wait() if following.done() else None
                if "IsolationError" in text:
                    return [_network_check(text, outcome, target)]
                why = (outcome and outcome.reason) or text[-300:] or "no output"
                return [Check("network isolation", False, f"probe listener failed: {why}")]
            status = (self._reflector.pod_for(objects.label_value(listener.id)) or {}).get(
                "status"
            ) or {}
            nodes = [ip for ip in [status.get("hostIP")] if ip]
            for ip in [status.get("podIP")] + [a.get("ip") for a in status.get("podIPs") or []]:
                family = "ipv6" if ip and ":" in ip else "ipv4"
                if ip and ip not in peer[family]:
                    peer[family].append(ip)
            node_ports = list(probes.NODE_PORTS)
            with contextlib.suppress(Exception):
                node_ports += probes.service_node_ports(
                    await raw_json(
                        self._core.list_service_for_all_namespaces(_preload_content=False)
                    )
                )
            plan = {"api": target, "peer": peer, "nodes": nodes, "node_ports": node_ports}
            code = probes.prober_code(plan, f"{objects.MOUNT}/runner.py") + _threads_code()
            prober = Execution(
                id=new_execution_id(),
                request=ExecutionRequest(code=code, timeout=90, resources=resources),
                user="crucible-doctor",
            )
            try:
                probe_box = await self.start(prober)
                out = b"\n".join([line async for _, line, _ in probe_box.lines()]).decode()
                outcome = await probe_box.wait()
            except CrucibleError as e:
                return [Check("network isolation", False, f"probe could not run: {e.message}")]
        finally:
            with contextlib.suppress(Exception):
                await sandbox.kill()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(following, 10)
            with contextlib.suppress(Exception):
                await sandbox.wait()
        text = b"\n".join(lines).decode("utf-8", "replace")
        contacts = re.findall(r"CONTACT (tcp|udp) ([0-9a-fA-F.:]+)", text)
        if "IsolationError" in out:
            check = _network_check(out, outcome, target)
        elif (report := probes.find_json(out, "NETPROBE")) is None:
            reason = outcome.reason or out[-300:] or "no output"
            check = Check("network isolation", False, f"probe failed: {reason}")
        else:
            check = probes.network_check(report, [" from ".join(c) for c in contacts], peer)
        return [check, _pids_check(out)]


def _threads_code() -> str:
    """Cell code printing ``THREADS n``: how many threads an executor can start (up to
    PIDS_PROBE, then lets them go). The pod's limit (podPidsLimit) sits on the pod's cgroup,
    which a container cannot read."""
    return (
        "\nimport threading\n"
        "threading.stack_size(65536)\n"
        "stop, started = threading.Event(), []\n"
        "try:\n"
        f"    for _ in range({PIDS_PROBE}):\n"
        "        t = threading.Thread(target=stop.wait)\n"
        "        t.start()\n"
        "        started.append(t)\n"
        "except RuntimeError:\n"
        "    pass\n"
        "stop.set()\n"
        "for t in started:\n"
        "    t.join()\n"
        "print('THREADS', len(started))\n"
    )


def _network_check(text: str, outcome: Outcome, target: str) -> Check:
    if "IsolationError" in text:
        return Check(
            "network isolation",
            False,
            f"NOT enforced: an executor pod could still reach {target} or the node"
            f" (its runner refused to run the cell: {text[-300:]})",
            fix="run a NetworkPolicy enforcer (a CNI with policy support, or kube-router)",
        )
    return Check("network isolation", False, f"probe failed: {outcome.reason or text[-200:]}")


def _pids_check(text: str) -> Check:
    found = re.search(r"THREADS (\d+)", text)
    if found and int(found.group(1)) < PIDS_PROBE:
        return Check(
            "process limit",
            True,
            f"an executor pod stops at {found.group(1)} threads (the kubelet's podPidsLimit)",
        )
    return Check(
        "process limit",
        False,
        f"executor pods have no process limit (a probe started {PIDS_PROBE} threads): a fork"
        " or thread bomb is stopped only by the memory limit, after it has slowed the node"
        if found
        else "the executor pod's process limit could not be measured",
        fix="set podPidsLimit (e.g. 1024) in the kubelet configuration of the nodes",
    )


class KubernetesSandbox(Sandbox):
    """One execution's Job, followed through the shared pod watch and the pod's log."""

    def __init__(
        self, backend: CrucibleKubernetesBackend, execution: Execution, name: str, *, isolation: str
    ) -> None:
        super().__init__(isolation=isolation)
        self.backend = backend
        self.execution = execution
        self.name = name
        self.key = objects.label_value(execution.id)
        self.failure: str | None = None
        self.cancelled = False
        self.started: bool | None = None
        self._stopped = asyncio.Event()  # cancel or kill: stop following, record the end now
        self._end: dict | None = None  # the runner's end frame (it may name a signal)

    def _reflector(self) -> PodReflector:
        assert self.backend._reflector is not None
        return self.backend._reflector

    def _container(self, pod: Pod | None) -> dict:
        statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
        return next((c for c in statuses if c.get("name") == "cell"), {})

    def _started_or_failed(self, pod: Pod | None) -> str | None:
        """'logs' once the container's log can be read; 'failed' if it never will."""
        if pod is None:
            return "failed" if self.key in self._reflector().gone else None
        state = self._container(pod).get("state") or {}
        if "running" in state or "terminated" in state:
            return "logs"
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in IMAGE_FAILURES:
            image = self._container(pod).get("image") or "?"
            self.failure = (
                f"{IMAGE_FAILURES[waiting['reason']]}: {image}"
                f" ({waiting.get('message') or waiting['reason']})"
            )
            return "failed"
        status = pod.get("status") or {}
        if status.get("phase") in ("Failed", "Succeeded") and not state:
            self.failure = status.get("message") or status.get("reason") or "pod failed"
            return "failed"
        return None

    async def _wait_started(self) -> bool:
        """Wait for the container to start; False (with ``failure``) if it cannot."""
        loop = asyncio.get_running_loop()
        unschedulable_since = None
        while True:
            try:
                result = await self._reflector().wait_for(self.key, self._started_or_failed, 2.0)
                return result == "logs"
            except TimeoutError:
                pass
            pod = self._reflector().pod_for(self.key)
            if pod is None:  # no pod after 2 s: did the Job controller fail to create it?
                problem = await self._job_problem()
                if problem and (self.backend.quota_policy == "fail" or "quota" not in problem):
                    self.failure = problem
                    return False
                continue
            cond = next(
                (
                    c
                    for c in (pod.get("status") or {}).get("conditions") or []
                    if c.get("type") == "PodScheduled"
                ),
                {},
            )
            if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                unschedulable_since = unschedulable_since or loop.time()
                if loop.time() - unschedulable_since > self.backend.unschedulable_timeout:
                    self.failure = f"unschedulable: {cond.get('message', 'no node fits')}"
                    return False
            else:
                unschedulable_since = None

    async def _job_problem(self) -> str | None:
        core = self.backend._core
        try:
            found = await raw_json(
                core.list_namespaced_event(
                    self.backend.namespace,
                    _preload_content=False,
                    field_selector=f"involvedObject.name={self.name},involvedObject.kind=Job",
                )
            )
            events = found.get("items", [])
        except Exception:
            return None
        for ev in sorted(events, key=lambda e: e.get("lastTimestamp") or "", reverse=True):
            if ev.get("reason") == "FailedCreate":
                msg = ev.get("message", "")
                if "exceeded quota" in msg:
                    return "resource quota exceeded: " + msg.split("forbidden: ", 1)[-1]
                return "the Job could not create its pod: " + msg
        return None

    async def ready(self) -> None:
        """Wait until the container runs, or it is clear it never will (``failure``)."""
        if self.started is None:
            self.started = await self._wait_started()

    async def lines(self) -> AsyncIterator[tuple[str, bytes, int]]:
        """The pod's log, line by line, as it is written; reopened if the stream breaks.

        Once the pod watch shows the container ended, the stream ends there if the runner's
        ``end`` frame (the last line it writes) was read, else the rest is read from the log
        whole (complete then): either way without waiting for the kubelet to end the
        followed stream, which it does up to seconds later."""
        await self.ready()
        if not self.started:
            return
        consumed = 0
        follow = True
        saw_end = False
        while True:
            pod = self._reflector().pod_for(self.key) or self._reflector().gone.get(self.key)
            if pod is None:
                return
            try:
                resp = await raw(
                    self.backend._core.read_namespaced_pod_log(
                        pod["metadata"]["name"],
                        self.backend.namespace,
                        container="cell",
                        follow=follow,
                        _preload_content=False,
                    )
                )
            except Exception as e:
                if self.cancelled or self._terminated(self._reflector().pod_for(self.key)):
                    if consumed:
                        return
                if self._reflector().pod_for(self.key) is None:
                    return
                self.log_warning(f"log of {self.name} not readable yet ({e}); retrying")
                await asyncio.sleep(0.2)
                continue
            index = 0
            lines = read_lines(resp.content, self.backend.max_line_bytes)
            ended = (
                asyncio.ensure_future(self._reflector().wait_for(self.key, self._terminated))
                if follow
                else asyncio.get_running_loop().create_future()  # a whole log just ends
            )
            try:
                while (item := await self._next_unless_stopped(lines, ended)) is not None:
                    if item is ENDED:
                        break
                    line, dropped = item
                    index += 1
                    if index <= consumed:
                        continue  # already delivered before the stream broke
                    consumed = index
                    if index == 1 and line == READY:
                        continue  # a warm pod's runner said it was ready: not the cell's
                    if END_FRAME.match(line):
                        saw_end = True
                        self._end = _end_frame(line)
                    yield FRAMES, line, dropped
                    if saw_end and self._terminated(self._reflector().pod_for(self.key)):
                        return
            except Exception as e:
                self.log_warning(f"log stream of {self.name} broke ({e!r}); reopening")
                continue
            finally:
                ended.cancel()
                await lines.aclose()
                resp.release()
            if item is ENDED:
                if saw_end:
                    return  # the runner's last line was read, and the container ended
                follow = False  # the container ended: read the rest of its log whole
                continue
            # the stream ended: normally because the container ended
            if self.cancelled:
                return  # being deleted: nothing more will come
            try:
                await self._reflector().wait_for(
                    self.key, lambda p: p is None or self._terminated(p), 5.0
                )
                return
            except TimeoutError:
                continue  # still running: the stream broke early; reopen and skip

    async def _next_unless_stopped(self, lines: AsyncIterator, ended: asyncio.Future) -> Any:
        """The next log line; None at its end or once the execution is being stopped;
        ENDED when ``ended`` (the container's end) comes first."""
        if self._stopped.is_set():
            return None
        nxt = asyncio.ensure_future(anext(lines))
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            done, _ = await asyncio.wait({nxt, stop, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if nxt not in done:
            nxt.cancel()
            with contextlib.suppress(BaseException):
                await nxt
            return ENDED if ended in done and stop not in done else None
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None

    def log_warning(self, text: str) -> None:
        """Warn through the backend's logger."""
        self.backend.log.warning("crucible: %s", text)

    def _ended(self, pod: Pod | None) -> Pod | None:
        """The pod once its container has terminated, or its last state once deleted."""
        if pod is None:
            return self._reflector().gone.get(self.key)
        return pod if self._terminated(pod) else None

    def _terminated(self, pod: Pod | None) -> dict | None:
        return (self._container(pod).get("state") or {}).get("terminated")

    async def wait(self) -> Outcome:
        """Wait for the pod's end and read the outcome from its status; delete the Job
        (in the background: the outcome is known, so it is not kept waiting for that)."""
        try:
            if self.failure:
                return Outcome(exit_code=None, reason=self.failure)
            ended = asyncio.ensure_future(self._reflector().wait_for(self.key, self._ended))
            stopped = asyncio.ensure_future(self._stopped.wait())
            try:
                await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if not ended.done():  # stopped on purpose: its exit status adds nothing
                ended.cancel()
                with contextlib.suppress(BaseException):
                    await ended
                return Outcome(exit_code=None)
            pod = ended.result()
            term = self._terminated(pod) or {}
            status = (pod or {}).get("status") or {}
            if status.get("reason") == "Evicted":
                return Outcome(exit_code=None, reason=f"evicted: {status.get('message', '')}")
            if term.get("reason") == "OOMKilled":
                limit = format_bytes(self.execution.request.resources.memory)
                return Outcome(term.get("exitCode", 137), f"memory limit exceeded ({limit})")
            if not term:
                reason = None if self.cancelled else "the pod disappeared before it finished"
                return Outcome(exit_code=None, reason=reason)
            code = term.get("exitCode")
            return Outcome(exit_code=code, signal=_reported_signal(self._end, code))
        finally:
            self.backend.later(self.backend.delete(self.name))

    async def interrupt(self) -> None:
        """Delete the Job (background propagation); its pod gets SIGTERM, which the runner
        turns into an interrupt. The execution ends now: the pod goes on its own."""
        self.cancelled = True
        self._stopped.set()
        await self.backend.delete(self.name, grace=2)

    async def kill(self) -> None:
        """Delete the Job and its pods at once."""
        self.cancelled = True
        self._stopped.set()
        await self.backend.delete_pods(self.execution.id, grace=0)
        await self.backend.delete(self.name, grace=0)


def _end_frame(line: bytes) -> dict | None:
    """The runner's end frame as a dict, or None if it does not parse as one."""
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return frame if isinstance(frame, dict) else None


def _reported_signal(end: dict | None, code: Any) -> int | None:
    """The signal that ended the cell, as the runner's end frame names it (the runner saw the
    cell's wait status; the cell cannot write to the pod's log), only if the container's exit
    code agrees (128 + N). None when the cell exited, or nothing was reported: an exit code
    alone is never read as a signal, since a cell can exit with 137."""
    signum = (end or {}).get("signal")
    if isinstance(signum, int) and not isinstance(signum, bool) and code == 128 + signum:
        return signum
    return None


async def _retry(call, attempts: int = 4, delay: float = 0.2):
    """Run an API call, retrying server errors and connection failures with backoff."""
    from kubernetes_asyncio.client.exceptions import ApiException

    for attempt in range(attempts):
        try:
            return await call()
        except ApiException as e:
            if e.status is not None and e.status < 500 and e.status != 429:
                raise
            if attempt == attempts - 1:
                raise
        except (OSError, asyncio.TimeoutError):
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(delay * 2**attempt)
    return None


def _api_message(e: Any) -> str:
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "reason", e))
