"""Run each execution as a Kubernetes Job, event-driven (one shared pod watch, no polling).

The backend holds the settings and puts the parts together: ``cluster.py`` owns the
connection (API clients, namespace, pod watch, every API call with its timeout),
``objects.py`` builds the Job and its ConfigMap, ``sandbox.py`` follows one execution's pod
(output from its log, outcome from its status: ``pods.py``), ``warm.py`` keeps warm pods,
``doctor.py`` reports health.

Warm pods (``warm_pods``, see ``warm.py``): executor pods started ahead, each waiting for
one cell on stdin; a request that fits one runs there instead of in a new Job.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

from traitlets import (
    Bool,
    Dict,
    Enum,
    Float,
    Instance,
    Integer,
    List,
    TraitError,
    Unicode,
    default,
    validate,
)

from ...errors import InvalidRequest, RequestTooLarge
from ...models import Execution, ExecutionRequest, Limits, Resources, format_bytes
from ...protocol import ENV_EXECUTION_ID, ENV_K8S_NAMESPACE, env_text
from ..base import Backend, Check, Sandbox
from . import doctor, objects, pods
from .cluster import Cluster
from .sandbox import Following, KubernetesSandbox
from .warm import WarmPool, WarmSpec

RUNNER = Path(__file__).resolve().parent.parent.parent / "runner.py"


class CrucibleKubernetesBackend(Backend):
    """Runs each execution as a hardened Kubernetes Job in one namespace."""

    name = "kubernetes"

    namespace = Unicode(
        help="Namespace where execution Jobs run (env CRUCIBLE_K8S_NAMESPACE).",
    ).tag(config=True)

    @default("namespace")
    def _default_namespace(self) -> str:
        return env_text(ENV_K8S_NAMESPACE, "crucible-executions")

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
        300,
        help="""Backstop: Kubernetes deletes finished Jobs after this many seconds (the
        dispatcher deletes each one itself once its outcome is recorded). It is also how long
        a cell that ends while no dispatcher runs keeps its outcome and output for the next
        one to collect: after a longer outage the cell is failed "dispatcher restarted".""",
    ).tag(config=True)
    deadline_padding = Integer(
        15,
        help="""A cold Job's activeDeadlineSeconds = 2 x the request's timeout (up to the
        timeout to start, then the timeout to run) + this: a backstop.""",
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

    request_timeout = Float(
        10.0,
        min=0.1,
        help="""Seconds one Kubernetes API call may take before it fails (for a followed
        log, a watch or an attach: the time to open it). A hung API server then fails the
        call with a clear error instead of hanging the cell, the warm pool or shutdown;
        a claim of a warm pod that times out sends its cell to a cold Job.""",
    ).tag(config=True)
    retry_timeout = Float(
        10.0,
        min=0.0,
        help="""Seconds the creation of an execution's ConfigMap and Job is retried (with
        backoff) after a server error, throttling (429), a timeout or a broken connection,
        before the execution fails.""",
    ).tag(config=True)

    # ----- handed over by the dispatcher that creates the backend (not settings) --------

    dispatcher_owner = Unicode(
        "crucible",
        help="""Who runs this backend: the dispatcher's ``host:pid``, which labels its pods
        (given by the dispatcher; a backend made on its own, as the doctor does, keeps the
        default).""",
    )
    default_resources = Instance(
        Resources,
        help="""What a request that asks for no resources gets (the dispatcher's default_cpu
        and default_memory): the resources of every warm pod. Given by the dispatcher.""",
    )

    @default("default_resources")
    def _default_default_resources(self) -> Resources:
        limits = Limits()
        return Resources(limits.default_cpu, limits.default_memory)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool: WarmPool | None = None
        self._runner_source = RUNNER.read_text()
        self._picked: dict[int, float] = {}  # uids picked lately -> when (see _pick_uid)
        self.dispatcher_id = objects.label_value(self.dispatcher_owner)
        self._cluster: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        """The connection to the cluster, made with this backend's settings on first use
        (:meth:`Cluster.connect` before its calls)."""
        if self._cluster is None:
            self._cluster = Cluster(
                namespace=self.namespace,
                kubeconfig=self.kubeconfig,
                create_namespace=self.create_namespace,
                request_timeout=self.request_timeout,
                retry_timeout=self.retry_timeout,
                # given targets: no lookup in `default` (the chart's Role refuses it);
                # "off" still looks, for the doctor's probe
                find_api_endpoint=self.isolation_probe in ("", "off"),
                log=self.log,
            )
        return self._cluster

    # ----- connection ----------------------------------------------------------------

    async def prepare(self) -> None:
        """Connect, and start the warm pods (``warm_pods``) in the background."""
        await self.cluster.connect()
        if self._pool is None and self.warm_pods > 0:
            self._pool = self.warm_pool()
            self._pool.start()

    def warm_pool(self) -> WarmPool:
        """The warm pool (a new, unstarted one when ``warm_pods`` is 0 or before
        :meth:`prepare`: what it would keep)."""
        if self._pool is not None:
            return self._pool
        spec = self._warm_spec()
        lifetime = max(0, self.warm_pod_lifetime - self.deadline_padding)

        def make_job(name: str, labels: dict) -> dict:
            return self.make_job(name, labels, spec.image, spec.resources, lifetime, {}, True)

        return WarmPool(self.cluster, spec, make_job, self.warm_pods, log=self.log)

    def _warm_spec(self) -> WarmSpec:
        return WarmSpec(
            image=self.image_for(None),
            resources=self.default_resources,
            lifetime=self.warm_pod_lifetime,
            deadline_padding=self.deadline_padding,
            start_timeout=self.unschedulable_timeout + 60,
            dispatcher_id=self.dispatcher_id,
            runner_source=self._runner_source,
        )

    def fits_warm(self, request: ExecutionRequest) -> bool:
        """Whether a warm pod can run ``request``: the default image and the default
        resources (those of every warm pod)."""
        spec = self._pool.spec if self._pool is not None else self._warm_spec()
        return self.image_for(request.image) == spec.image and request.resources == spec.resources

    async def close(self) -> None:
        """Retire the warm pods no cell claimed, stop the pod watch, close the API."""
        if self._pool is not None:
            with contextlib.suppress(Exception):  # bounded: a hung API call must not
                await asyncio.wait_for(self._pool.stop(), 30)  # keep the dispatcher up
            self._pool = None
        if self._cluster is not None:
            await self._cluster.close()

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
            await_isolation=self.isolation_target(),
            warm=warm,
        )

    def _output_limit(self) -> int | None:
        """The dispatcher's output limit (the runner writes no more output than that)."""
        limit = self.output_limit
        return limit if limit is not None and limit > 0 else None

    def _pick_uid(self) -> int:
        """A uid from :attr:`uid_range` that no executor pod in the namespace runs as, nor
        one this backend picked in the last minutes (its pod may not be watched yet)."""
        if not self.uid_range:
            return self.run_as_uid
        first, last = self.uid_range
        now = time.monotonic()
        self._picked = {u: t for u, t in self._picked.items() if now - t < 300}
        used: set[int | None] = set(self._picked)
        reflector = self.cluster.reflector
        for pod in reflector.pods.values() if reflector is not None else ():
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

    async def start(self, execution: Execution) -> Sandbox:
        """Hand the execution to a warm pod if one can run it, else create its ConfigMap
        and Job; return a sandbox following its pod."""
        image = self.image_for(execution.request.image)
        warm = self.fits_warm(execution.request)
        if warm:
            await self.prepare()  # (the dispatcher's own call may still be connecting)
        else:
            await self.cluster.connect()
        isolation = "kubernetes" + (f"/{self.runtime_class}" if self.runtime_class else "")
        key = objects.label_value(execution.id)
        await self._clear_previous(key)
        self.cluster.pods.hold(key)  # from here on its pod's last state is kept
        try:
            if warm and self._pool is not None and (name := await self._pool.run(execution)):
                return self._sandbox(execution, name, f"{isolation}+warm")
            req = execution.request
            name = objects.job_name(execution.id)
            labels = objects.labels(execution.id, execution.user, self.dispatcher_id)
            job = self.make_job(
                name, labels, image, req.resources, req.timeout,
                {**req.env, ENV_EXECUTION_ID: execution.id},
            )  # fmt: skip
            configmap = objects.make_configmap(name, req.code, self._runner_source, labels)
            await self.cluster.create_job(job, configmap)
            return self._sandbox(execution, name, isolation)
        except BaseException:  # cancelled too: release the pod key, then re-raise
            if self.cluster.reflector is not None:
                self.cluster.reflector.release(key)
            raise

    async def _clear_previous(self, key: str) -> None:
        """Delete a pod this execution had before, and wait (bounded) until it is gone: a
        warm pod claimed for it whose cell never came (its dispatcher died in between; the
        execution is queued again). Its sandbox finds its pod by the execution's label, so
        only one pod may carry it. None: nothing to wait for (the usual case)."""
        old = self.cluster.pods.pod_for(key)
        if old is None:
            return
        await self.cluster.delete(pods.job_of(old) or old["metadata"]["name"], grace=0)
        await self.cluster.delete_pods(key, grace=0)
        with contextlib.suppress(TimeoutError):
            await self.cluster.pods.wait_for(key, lambda p: p is None, 30)

    def _sandbox(self, execution: Execution, name: str, isolation: str) -> KubernetesSandbox:
        following = Following(self.quota_policy, self.unschedulable_timeout, self.max_line_bytes)
        return KubernetesSandbox(self.cluster, following, execution, name, isolation=isolation)

    async def reattach(self, execution: Execution) -> Sandbox | None:
        """Follow the Job of an execution a dead dispatcher started, if it still exists."""
        await self.cluster.connect()
        name = objects.job_name(execution.id)
        if not await self.cluster.job_exists(name):
            # a warm pod claimed for it? (found by the execution's label, like any pod)
            pod = self.cluster.pods.pod_for(objects.label_value(execution.id))
            job = pods.job_of(pod) if pod is not None else None
            if not job:
                return None
            name = job
        return self._sandbox(execution, name, execution.isolation or "kubernetes")

    def isolation_target(self) -> str | None:
        """What a runner must find unreachable before its cell runs (``isolation_probe``),
        None when that wait is off or nothing is known to probe."""
        if self.isolation_probe == "off":
            return None
        return self.isolation_probe or self.cluster.api_endpoint

    async def sweep(self, live: set[str]) -> int:
        """Delete executor Jobs whose execution is not live here (orphans of a crash)."""
        await self.cluster.connect()
        jobs = await self.cluster.executor_jobs()
        keep = {objects.label_value(i) for i in live}
        by_job = {pods.job_of(p): p for p in self.cluster.pods.pods.values() if pods.job_of(p)}
        mine = self._pool.jobs() if self._pool is not None else set()
        orphans = [
            job["metadata"]["name"]
            for job in jobs
            if job["metadata"]["name"] not in mine
            and pods.job_execution(job, by_job.get(job["metadata"]["name"])) not in keep
        ]
        for name in orphans:
            self.log.warning("crucible: deleting orphaned Job %s", name)
            await self.cluster.delete(name, grace=0)
        return len(orphans)

    # ----- health --------------------------------------------------------------------

    async def checks(self) -> list[Check]:
        """Cluster reachable, namespace usable, NetworkPolicy present, warm pods, seccomp,
        and executor probes of network isolation and the process limit (``doctor.py``)."""
        return await doctor.checks(self)
