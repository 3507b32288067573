"""Warm pods: executor pods started ahead of their cell, each waiting for exactly one cell.

A cold execution waits for its Job's pod to be scheduled, its container to start and the
runner to load (about 2 s on the dev cluster). A warm pod has done all of that, and passed
the runner's ``--await-isolation`` check (the deny-all NetworkPolicy is in effect), before
it counts as warm: its runner then writes :data:`~.objects.READY_LINE` to its log and waits
for the cell on stdin. The pool attaches to its stdin as soon as it is warm and holds that
connection, so claiming it costs an API patch and one websocket message: the cell as one
JSON line (``{"code", "env"}``); closing the connection then closes stdin (``stdinOnce``).
The pod stays one-shot: it runs that cell, ends and is deleted; the pool starts a new one
in the background once the cell has ended (or ``REFILL_PAUSE`` after the claim).

Design: warm pods are **Jobs** with generic names (``crucible-warm-…``), found by label,
not bare Pods with an ownerReference, because a Job makes a pod that nobody looks after
again clean itself up: the Job's ``activeDeadlineSeconds`` (:attr:`warm_pod_lifetime
<.backend.CrucibleKubernetesBackend.warm_pod_lifetime>`) ends a warm pod that no cell
claimed, and ``ttlSecondsAfterFinished`` then deletes it. So a dispatcher that dies leaks
nothing, even where no sole dispatcher sweeps (several dispatchers sharing a namespace). A
bare pod needs an owner whose deletion removes it, and that owner would leak in turn.
(Sooner still: the stdin connection a dead dispatcher held drops, stdin closes, and the
waiting runner exits at once; its Job completes and is deleted after the TTL.)
Everything the cold path does with a Job (cancel deletes it; the sandbox's end deletes it
with its ConfigMap; the same pod watch, log follow, outcome and OOM reading) then applies
to a warm pod unchanged. A claim sets the Job's deadline to the cell's timeout.

Labels of a warm pod: ``pool`` (a hash of what it runs: :func:`~.objects.pool_key`) and
``state``: ``warming`` → ``warm`` → ``claimed`` (or ``retired`` when its dispatcher stops).
Claiming is one JSON patch with ``test`` operations on both labels, so it applies only while
the pod is warm for that hash, atomically on the API server: two dispatchers sharing a
namespace never get the same pod, and either may claim a pod the other started (attaching
to it then; the pool that started it keeps its own connection open until that pod ends,
since closing it would close the pod's stdin — a dispatcher that dies in the tenth of a
second between another's claim and its write is the one case left). The claim
also writes the execution's labels onto the pod, so everything that finds an execution's pod
by label (the pod watch, kill, reattach after a restart, the sweep of orphans) works for it.

Only requests a warm pod can honour use one: the default image and the default resources
(those of the pool's pods, :class:`WarmSpec`); the backend decides, and anything else takes
the cold path. The pool is given the cluster connection (``cluster.py``), what its pods run
(:class:`WarmSpec`) and a factory of their Jobs; it knows nothing else of the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...models import Execution, Resources
from ...protocol import ENV_EXECUTION_ID
from . import objects
from .cluster import Cluster
from .pods import Pod, age, container, job_of, running, state_of

#: Seconds the refill waits after a claim for the claimed cell to end (it starts sooner
#: when the cell ends); a pod started beside the cell would slow the cell down.
REFILL_PAUSE = 1.0
#: Longest wait of a cell for a warm pod being started, when none is warm (then: cold).
WAIT_FOR_STARTING = 10.0
#: Longest wait for a warm pod's runner to say it is ready once its container runs.
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class WarmSpec:
    """What every warm pod of a pool runs, and for how long."""

    image: str  # the backend's default image
    resources: Resources  # what a request without resources gets (the dispatcher's defaults)
    lifetime: int  # seconds a warm pod may wait for a cell (warm_pod_lifetime)
    deadline_padding: int  # added to a claimed pod's deadline, as for a cold Job
    start_timeout: float  # seconds a warm pod may take to start
    dispatcher_id: str  # label value of this dispatcher
    runner_source: str  # the runner every pod runs (part of the pool key)


#: Makes the Job of a warm pod: ``(name, labels) -> Job``, with the backend's settings.
JobFactory = Callable[[str, dict], dict]


class WarmPool:
    """Keeps ``size`` warm pods of this dispatcher in the namespace and claims warm pods
    (its own first, any with the same pool key next) for the executions that fit them."""

    def __init__(
        self, cluster: Cluster, spec: WarmSpec, make_job: JobFactory, size: int,
        log: logging.Logger | None = None,
    ) -> None:  # fmt: skip
        self.cluster = cluster
        self.spec = spec
        self.make_job = make_job
        self.size = size
        self.log = log or logging.getLogger(__name__)
        template = self._job("crucible-warm-template")
        self.key = objects.pool_key(template, spec.runner_source)
        self.problem: str | None = None  # why the last warm pod did not become warm
        self._jobs: set[str] = set()  # Jobs this pool created (to retire them at stop)
        self._ready: dict[str, str] = {}  # pods of this pool that became warm -> Job
        self._starting: set[asyncio.Task] = set()
        self._claiming: set[str] = set()  # pods a claim here is trying or took
        self._waiting = 0  # claims waiting for a pod being started
        self._busy: set[str] = set()  # pods claimed here whose cell may still run
        self._stdin: dict[str, Any] = {}  # pod -> its stdin, attached while it warmed
        self._quiet_until = 0.0  # no refill before this (loop time) while a cell runs
        self._failures = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ----- keeping the pool full ---------------------------------------------------

    def start(self) -> None:
        """Start filling the pool in the background."""
        if self._task is None and self.size > 0:
            self.cluster.pods.listeners.append(self._on_pod)
            self._fill()  # now: a cell that comes next waits for these, not for the loop
            self._task = asyncio.create_task(self._keep(), name="crucible-warm-pool")

    def _job(self, name: str) -> dict:
        labels = objects.warm_labels(name, self.spec.dispatcher_id, getattr(self, "key", ""))
        return self.make_job(name, labels)

    def _on_pod(self, pod: Pod) -> None:
        name = pod["metadata"]["name"]
        if name in self._ready or name in self._busy or name in self._stdin:
            self._wake.set()

    def _cell_running(self) -> bool:
        """Whether a cell claimed here in the last moment still runs."""
        pods = self.cluster.pods.pods
        self._busy = {n for n in self._busy if running(pods.get(n))}
        return bool(self._busy)

    def _alive(self, name: str) -> bool:
        pod = self.cluster.pods.pods.get(name)
        return (
            pod is not None
            and state_of(pod) in ("warming", "warm")
            and not pod["metadata"].get("deletionTimestamp")
            and not (container(pod).get("state") or {}).get("terminated")
            and (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded")
        )

    def available(self) -> int:
        """Warm pods of this pool, and those being started."""
        pods = self.cluster.pods.pods
        for name in [n for n in self._stdin if not running(pods.get(n))]:
            self._detach(name)  # (kept open while another dispatcher's cell runs there)
        for name in [n for n in self._ready if not self._alive(n)]:
            job = self._ready.pop(name)
            self._jobs.discard(job)  # claimed, or ended
            pod = pods.get(name)
            if pod is not None and state_of(pod) in ("warming", "warm"):
                self.cluster.later(self._delete(job))  # ended unclaimed (its lifetime)
        return len(self._starting) + len(self._ready)

    def _fill(self) -> None:
        for _ in range(self.size - self.available()):
            task = asyncio.create_task(self._start_one())
            self._starting.add(task)
            task.add_done_callback(self._started)

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            quiet = self._quiet_until - loop.time()
            if quiet > 0 and self._cell_running():
                # a pod starting beside a cell that was just handed over slows it down (its
                # attach, its run, its end): refill when it ends, or after a moment
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), quiet)
                continue
            self._fill()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 30)
            if self._failures:  # do not start pod after pod that cannot become warm
                await asyncio.sleep(min(60.0, 2.0**self._failures))

    def _started(self, task: asyncio.Task) -> None:
        self._starting.discard(task)
        self._wake.set()

    async def _start_one(self) -> None:
        name = f"crucible-warm-{secrets.token_hex(5)}"
        self._jobs.add(name)
        self.cluster.pods.hold(name)  # (its pod's last state tells why it did not start)
        try:
            job = self._job(name)
            labels = job["metadata"]["labels"]
            configmap = objects.make_configmap(name, "", self.spec.runner_source, labels)
            await self.cluster.create_job(job, configmap)
            pod_name = await self._until_ready(name)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- whatever it was, this pod is given up
            self._failures += 1
            self.problem = str(getattr(e, "message", e)) or repr(e)
            self.log.warning("crucible: a warm pod did not become warm: %s", self.problem)
            await self._delete(name)
            return
        finally:
            if self.cluster.reflector is not None:  # (None once closed)
                self.cluster.reflector.release(name)
        self._failures = 0
        self.problem = None
        self._ready[pod_name] = name

    async def _until_ready(self, name: str) -> str:
        """Wait until the pod of warm Job ``name`` says it is ready; mark it warm."""
        reflector = self.cluster.pods
        limit = self.spec.start_timeout

        def started(pod: Pod | None) -> Any:
            if pod is None:
                return "gone" if name in reflector.gone else None
            state = container(pod).get("state") or {}
            waiting = (state.get("waiting") or {}).get("reason")
            if "running" in state or "terminated" in state:
                return pod
            if waiting in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"):
                return f"image {self.spec.image}: {waiting}"
            if (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                return "the pod ended"
            return None

        try:
            pod = await reflector.wait_for(name, started, limit)
        except TimeoutError:
            raise TimeoutError(f"its pod did not start within {limit:.0f} s") from None
        if not isinstance(pod, dict):
            raise RuntimeError(pod)
        pod_name = pod["metadata"]["name"]
        resp = await self.cluster.open_log(pod_name, follow=True)
        try:
            first = await asyncio.wait_for(resp.content.readline(), READY_TIMEOUT)
        finally:
            resp.close()
        if first.rstrip(b"\n").decode(errors="replace") != objects.READY_LINE:
            said = (await self.cluster.read_log(pod_name)).strip()
            raise RuntimeError(f"its runner said: {said[-400:] or '(nothing)'}")
        # attach to its stdin now, so a claim here only writes the cell (an attach takes
        # ~0.1 s); stdin stays open while this is open (stdinOnce), and closes with it
        self._stdin[pod_name] = await self._attach(pod_name)
        try:
            await self.cluster.patch_pod(pod_name, objects.state_patch("warming", "warm"))
        except BaseException:  # cancelled too: release the stdin, then re-raise
            self._detach(pod_name)  # its Job is deleted: do not keep its stdin open
            raise
        return pod_name

    # ----- claiming ----------------------------------------------------------------

    def warm_pods(self) -> list[Pod]:
        """Warm pods in the namespace this pool could claim, its own first, oldest first."""
        reflector = self.cluster.pods
        self._claiming &= set(reflector.pods)
        fresh = self.spec.lifetime - 60  # not one about to reach its lifetime
        pods = [
            p
            for p in reflector.pods.values()
            if (state_of(p) == "warm" or p["metadata"]["name"] in self._ready)
            and state_of(p) in ("warm", "warming")  # (the watch may not show our patch yet)
            and (p["metadata"].get("labels") or {}).get(objects.POOL_LABEL) == self.key
            and not p["metadata"].get("deletionTimestamp")
            and p["metadata"]["name"] not in self._claiming
            and running(p)
            and age(p) < fresh
        ]
        mine = self.spec.dispatcher_id
        return sorted(
            pods,
            key=lambda p: (
                p["metadata"]["labels"].get(objects.DISPATCHER_LABEL) != mine,
                p["metadata"].get("creationTimestamp", ""),
            ),
        )

    async def run(self, execution: Execution) -> str | None:
        """Claim a warm pod for ``execution`` and send it the cell; the name of its Job,
        or None when no warm pod can run it (the caller then creates a cold Job). With
        none warm, it waits for one this pool is starting if no other cell waits for it.
        The caller has checked that the request fits (the spec's image and resources)."""
        pods = self.warm_pods()
        if not pods and len(self._starting) > self._waiting and not self._failures:
            # none warm, one starting for no one yet: it started before a cold Job would
            # (but a pod that does not come soon, e.g. refused by a quota, is not awaited)
            self._waiting += 1
            try:
                await asyncio.wait(
                    set(self._starting), timeout=WAIT_FOR_STARTING,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
            finally:
                self._waiting -= 1
            pods = self.warm_pods()
        return await self._claim(execution, pods)

    async def _claim(self, execution: Execution, pods: list[Pod]) -> str | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        req = execution.request
        for pod in pods:
            name = pod["metadata"]["name"]
            self._claiming.add(name)
            self._busy.add(name)  # before the patch: the watch may show it claimed at once
            self._quiet_until = asyncio.get_running_loop().time() + REFILL_PAUSE
            deadline = self._deadline(pod, req.timeout)
            patch = objects.claim_patch(
                self.key, execution.id, execution.user, self.spec.dispatcher_id, deadline
            )
            try:
                await self.cluster.patch_pod(name, patch)
            except ApiException as e:
                self._busy.discard(name)
                if e.status in (404, 409, 422):  # claimed by another, or gone: the next
                    continue
                self.log.warning("crucible: cannot claim a warm pod (%s); starting a Job", e)
                return None
            except Exception as e:  # noqa: BLE001 -- a timeout, a connection that broke
                self._busy.discard(name)
                # the claim may have applied: give the pod up (it carries the execution's
                # labels, which must lead to one pod only) before the cell goes cold
                self.log.warning("crucible: claiming warm pod %s failed (%r); starting a Job",
                                 name, e)  # fmt: skip
                await self._abandon(job_of(pod) or name, execution)
                return None
            self._wake.set()  # refill (after the pause)
            job = job_of(pod) or name
            try:
                await self._send(name, execution)
            except Exception as e:  # noqa: BLE001 -- whatever it was, the cell goes cold
                self.log.warning("crucible: warm pod %s did not take its cell (%r)", name, e)
                await self._abandon(job, execution)
                return None
            self.cluster.later(self._adopt(job, pod, execution))  # not needed to run the cell
            return job
        return None

    async def _attach(self, pod_name: str) -> Any:
        """A websocket attached to the stdin of the pod's container, read in the
        background (its pings answered) until it closes."""
        ws = await self.cluster.attach_stdin(pod_name)
        self.cluster.later(self._read(ws))
        return ws

    @staticmethod
    async def _read(ws: Any) -> None:
        """Read what the server sends until it closes (answers its pings meanwhile)."""
        with contextlib.suppress(Exception):  # a closed or broken socket: nothing to read
            async for _ in ws:
                pass

    def _detach(self, pod_name: str) -> None:
        ws = self._stdin.pop(pod_name, None)
        if ws is not None:
            self.cluster.later(ws.close())

    async def _send(self, pod_name: str, execution: Execution) -> None:
        """Write the cell as one JSON line to the pod's stdin (attached while it warmed, or
        now for a pod of another dispatcher's pool), then close stdin."""
        cell = {
            "code": execution.request.code,
            "env": {**execution.request.env, ENV_EXECUTION_ID: execution.id},
            "rlimit_as": None,
        }
        line = json.dumps(cell).encode() + b"\n"
        ws = self._stdin.pop(pod_name, None) or await self._attach(pod_name)
        try:  # (0: the stdin channel)
            await asyncio.wait_for(ws.send_bytes(b"\x00" + line), self.cluster.request_timeout)
        finally:
            self.cluster.later(ws.close())  # stdin closes after what was written

    def _deadline(self, pod: Pod, timeout: float) -> int:
        """activeDeadlineSeconds for a claimed pod: counted from its start, so its age plus
        the cell's timeout, plus the backstop padding (as for a cold Job)."""
        return math.ceil(age(pod) + timeout) + self.spec.deadline_padding

    async def _adopt(self, job: str, pod: Pod, execution: Execution) -> None:
        """Label the Job with its execution and give it the cell's deadline (it had the
        pool's), so a sweep and ``kubectl get jobs`` see whose it is."""
        labels = objects.labels(execution.id, execution.user, self.spec.dispatcher_id)
        labels[objects.STATE_LABEL] = "claimed"
        deadline = self._deadline(pod, execution.request.timeout) + 10  # after the pod's
        body = {"metadata": {"labels": labels}, "spec": {"activeDeadlineSeconds": deadline}}
        try:
            await self.cluster.patch_job(job, body)
        except Exception as e:  # noqa: BLE001 -- the pod's own deadline (set by the claim) applies
            self.log.warning("crucible: cannot label warm pod Job %s as claimed: %s", job, e)

    async def _abandon(self, job: str, execution: Execution) -> None:
        """Delete a claimed pod that did not get its cell, so a cold Job can run it (its
        last state is not kept: the cold Job's pod carries the same execution label)."""
        key = objects.label_value(execution.id)
        reflector = self.cluster.pods
        with contextlib.suppress(Exception):  # bounded: the cell is waiting to go cold
            await self.cluster.delete(job, grace=0)
        with contextlib.suppress(TimeoutError):
            await reflector.wait_for(key, lambda p: p is None, 15)
        reflector.gone.pop(key, None)

    # ----- stopping and reporting ----------------------------------------------------

    async def stop(self) -> None:
        """Stop filling the pool; delete this pool's pods that no cell claimed."""
        if self._task is not None:
            self._task.cancel()
        tasks = [t for t in [self._task, *self._starting] if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        reflector = self.cluster.pods
        if self._on_pod in reflector.listeners:
            reflector.listeners.remove(self._on_pod)
        pods = {job_of(p): p for p in reflector.pods.values() if job_of(p)}
        await asyncio.gather(*(self._retire(job, pods.get(job)) for job in list(self._jobs)))
        self._jobs.clear()
        if self._stdin:  # pods claimed by another dispatcher: let its cell arrive first
            if any(state_of(reflector.pods.get(n)) == "claimed" for n in self._stdin):
                await asyncio.sleep(1.0)
            for name in list(self._stdin):
                self._detach(name)

    async def _retire(self, job: str, pod: Pod | None) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        if pod is not None and state_of(pod) == "warm":  # atomically, or another's claim wins
            try:
                await self.cluster.patch_pod(
                    pod["metadata"]["name"], objects.state_patch("warm", "retired")
                )
            except ApiException as e:
                if e.status == 422:
                    return  # claimed meanwhile: its execution deletes it
        elif state_of(pod) not in (None, "warming"):
            return  # claimed
        if pod is not None:
            self._detach(pod["metadata"]["name"])
        await self._delete(job)

    async def _delete(self, job: str | None) -> None:
        if job:
            self._jobs.discard(job)
            with contextlib.suppress(Exception):  # its lifetime and TTL remove it anyway
                await self.cluster.delete(job, grace=0)

    def jobs(self) -> set[str]:
        """The Jobs this pool started and has not given up (no orphans to sweep)."""
        return set(self._jobs)

    def report(self) -> str:
        """The pool in a line: configured size, warm / starting / running pods of its key
        (none counted before the cluster is connected)."""
        reflector = self.cluster.reflector
        pods = [
            p
            for p in (reflector.pods.values() if reflector is not None else ())
            if (p["metadata"].get("labels") or {}).get(objects.POOL_LABEL) == self.key
            and not p["metadata"].get("deletionTimestamp")
        ]
        count = {s: sum(state_of(p) == s for p in pods) for s in ("warm", "warming", "claimed")}
        resources = self.spec.resources
        return (
            f"warm_pods = {self.size}; in namespace {self.cluster.namespace!r}:"
            f" {count['warm']} warm, {count['warming']} starting, {count['claimed']} running"
            f" a cell (pool {self.key}; {resources.cpu:g} CPU,"
            f" {resources.memory >> 20} MiB, image {self.spec.image})"
        )
