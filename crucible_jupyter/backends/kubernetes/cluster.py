"""The connection to the cluster: one namespace, its API clients, its pod watch, and every
Kubernetes API call crucible makes.

Every call is bounded (``request_timeout``, as kubespawner's ``k8s_api_request_timeout``):
a hung API server fails the call with a clear error instead of hanging whoever made it.
Streams are bounded while they open (connecting, and the server's answer); a followed log
or a watch then stays open as long as it has something to say (a quiet cell writes
nothing for minutes). Creating an execution's objects retries server errors and
connection failures with backoff for up to ``retry_timeout`` seconds (as kubespawner's
``k8s_api_request_retry_timeout``). Calls return raw JSON dicts (``api.raw_json``), never
the generated models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from ...errors import Unavailable
from . import objects
from .api import raw, raw_json
from .reflector import PodReflector

JSON_PATCH = "application/json-patch+json"


class Cluster:
    """One namespace of one cluster, as crucible uses it; :meth:`connect` before use."""

    def __init__(
        self,
        *,
        namespace: str,
        kubeconfig: str = "",
        create_namespace: bool = True,
        request_timeout: float = 10.0,
        retry_timeout: float = 10.0,
        find_api_endpoint: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.create_namespace = create_namespace
        #: seconds one API call may take (streams: to open)
        self.request_timeout = request_timeout
        #: seconds the creation of an execution's objects is retried
        self.retry_timeout = retry_timeout
        #: look up the API server's addresses (in ``default``) on connect; False when the
        #: isolation probe's targets are given, so a Role confined to one namespace is
        #: not asked for them (and no misleading warning is logged)
        self.find_api_endpoint = find_api_endpoint
        self.log = log or logging.getLogger(__name__)
        self.api: Any = None
        self.core: Any = None
        self.batch: Any = None
        self.networking: Any = None
        self.reflector: PodReflector | None = None
        #: every address of the API server as pods see it (``HOST:PORT,...``), if found
        self.api_endpoint: str | None = None
        self._ws: Any = None
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()

    # ----- connecting and closing ---------------------------------------------------

    async def connect(self) -> None:
        """Load the configuration, make sure the namespace and its deny-all NetworkPolicy
        exist, find the API server's addresses (unless ``find_api_endpoint`` is False) and
        start the pod watch (once)."""
        async with self._lock:
            if self.core is not None:
                return
            from kubernetes_asyncio import client, config

            try:
                if not self.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
                    config.load_incluster_config()
                    api = client.ApiClient()
                else:
                    api = await config.new_client_from_config(config_file=self.kubeconfig or None)
            except Exception as e:  # any failure to read a configuration means the same
                raise Unavailable(
                    f"cannot load Kubernetes configuration ({e}); set"
                    " c.CrucibleKubernetesBackend.kubeconfig or KUBECONFIG"
                ) from e
            self.api = api
            self.core = client.CoreV1Api(api)
            self.batch = client.BatchV1Api(api)
            self.networking = client.NetworkingV1Api(api)
            try:
                await self._ensure_network_policy()
                if self.find_api_endpoint:
                    self.api_endpoint = await self._find_api_endpoint()
                self.reflector = PodReflector(
                    self.core,
                    self.namespace,
                    f"{objects.APP_LABEL}={objects.APP}",
                    log=self.log,
                    request_timeout=self.request_timeout,
                )
                await asyncio.wait_for(self.reflector.start(), 30)
            except Unavailable:
                await self.close()
                raise
            except Exception as e:  # the watch's first list: whatever it was, say so
                await self.close()
                raise Unavailable(f"cannot watch pods in namespace {self.namespace!r}: {e}") from e

    @property
    def pods(self) -> PodReflector:
        """The pod watch (connected)."""
        if self.reflector is None:
            raise Unavailable("not connected to the cluster (or closed)")
        return self.reflector

    def ws_api(self) -> Any:
        """The websocket API client (pod attach), created on first use."""
        if self._ws is None:
            from kubernetes_asyncio.stream import WsApiClient

            self._ws = WsApiClient(configuration=self.api.configuration)
        return self._ws

    async def close(self) -> None:
        """Wait (10 s at most) for the background calls, stop the watch, close the API."""
        if self._background:  # deletions under way
            await asyncio.wait(set(self._background), timeout=10)
        if self._ws is not None:
            with contextlib.suppress(Exception):  # closing: nothing to do about it
                await asyncio.wait_for(self._ws.close(), 10)
            self._ws = None
        if self.reflector is not None:
            await self.reflector.stop()
            self.reflector = None
        if self.api is not None:
            api, self.api, self.core, self.batch, self.networking = self.api, None, None, None, None
            await api.close()
            # TLS connections finish closing on the next loop iterations (aiohttp's
            # documented graceful shutdown); without this their sockets leak at loop close
            await asyncio.sleep(0.25)

    def later(self, coro: Awaitable[Any]) -> None:
        """Run an API call in the background (``close`` waits for it); a failure is logged,
        never left as an unretrieved task exception."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(self._log_failure)

    def _log_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.warning("crucible: a background Kubernetes call failed: %s", task.exception())

    # ----- calls --------------------------------------------------------------------

    async def call(self, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` of an API client, bounded by ``request_timeout``; its
        JSON answer. A non-2xx answer raises ``ApiException``; a timeout, TimeoutError."""
        if self.api is None:
            raise Unavailable("not connected to the cluster (or closed)")
        kwargs.update(_preload_content=False, _request_timeout=self.request_timeout)
        return await raw_json(method(*args, **kwargs))

    async def retry(
        self,
        call: Callable[[], Awaitable[Any]],
        conflict: Callable[[], Awaitable[Any]] | None = None,
    ) -> Any:
        """``call()``, retrying server errors, throttling and connection failures with
        backoff for up to ``retry_timeout`` seconds. ``conflict``: what a retry that finds
        the object already there returns (the attempt that failed had created it)."""
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        delay = 0.2
        for attempt in range(1000):
            try:
                return await call()
            except ApiException as e:
                if e.status == 409 and attempt and conflict is not None:
                    return await conflict()
                if e.status is not None and e.status < 500 and e.status != 429:
                    raise
                if loop.time() + delay > deadline:
                    raise
            except (OSError, asyncio.TimeoutError, aiohttp.ClientError):
                if loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return None

    def _timed_out(self, what: str) -> Unavailable:
        return Unavailable(
            f"the Kubernetes API server did not answer {what} within {self.request_timeout:g} s;"
            " check the cluster, or raise c.CrucibleKubernetesBackend.request_timeout"
        )

    async def create_job(self, job: dict, configmap: dict) -> dict:
        """Create ``configmap`` (the runner and the cell) and then ``job`` (retried); the
        Job as created. The ConfigMap is made owned by the Job in the background (it goes
        when the Job goes). Refused: Unavailable saying why, and the ConfigMap is deleted."""
        from kubernetes_asyncio.client.exceptions import ApiException

        name, ns = job["metadata"]["name"], self.namespace
        # a cell near max_code_bytes() makes a request body over 1 MiB (1.4 MB at most),
        # which aiohttp warns about (it writes it in one go): expected here, not a problem
        warnings.filterwarnings("ignore", "Sending a large body directly", ResourceWarning)

        async def existing_configmap() -> None:
            return None

        try:
            await self.retry(
                lambda: self.call(self.core.create_namespaced_config_map, ns, configmap),
                conflict=existing_configmap,
            )
            created = await self.retry(
                lambda: self.call(self.batch.create_namespaced_job, ns, job),
                conflict=lambda: self.call(self.batch.read_namespaced_job, name, ns),
            )
        except (ApiException, asyncio.TimeoutError) as e:
            with contextlib.suppress(Exception):  # best effort: it is owned by nothing
                await self.call(self.core.delete_namespaced_config_map, name, ns)
            if isinstance(e, asyncio.TimeoutError):
                raise self._timed_out("the creation of a Job") from e
            raise Unavailable(f"Kubernetes refused the Job: {api_message(e)}") from e
        self.later(self._own_configmap(name, created))  # not waited for: the pod needs none
        return created

    async def _own_configmap(self, name: str, job: dict) -> None:
        body = {"metadata": {"ownerReferences": [objects.owner_reference(job)]}}
        await self.call(self.core.patch_namespaced_config_map, name, self.namespace, body)

    async def delete(self, name: str, grace: int | None = None) -> None:
        """Delete a Job (and its pods, in the background) and its ConfigMap, both at once;
        a gone Job is not an error."""
        from kubernetes_asyncio.client.exceptions import ApiException

        async def quietly(call: Awaitable[Any]) -> None:
            with contextlib.suppress(ApiException):
                await call

        await asyncio.gather(
            quietly(self.call(
                self.batch.delete_namespaced_job, name, self.namespace,
                propagation_policy="Background", grace_period_seconds=grace,
            )),
            quietly(self.call(self.core.delete_namespaced_config_map, name, self.namespace)),
        )  # fmt: skip

    async def delete_pods(self, execution_label: str, grace: int) -> None:
        """Delete the pods of an execution with a grace period (SIGTERM, then SIGKILL)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            await self.call(
                self.core.delete_collection_namespaced_pod,
                self.namespace,
                grace_period_seconds=grace,
                label_selector=f"{objects.EXECUTION_LABEL}={execution_label}",
            )

    async def patch_pod(self, name: str, patch: list) -> dict:
        """Apply a JSON patch (with its ``test`` operations, atomically) to a pod."""
        return await self.call(
            self.core.patch_namespaced_pod, name, self.namespace, patch, _content_type=JSON_PATCH
        )

    async def patch_job(self, name: str, body: dict) -> dict:
        """Merge ``body`` into a Job."""
        return await self.call(self.batch.patch_namespaced_job, name, self.namespace, body)

    async def job_exists(self, name: str) -> bool:
        """Whether the Job ``name`` exists."""
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            await self.call(self.batch.read_namespaced_job, name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            return False
        return True

    async def executor_jobs(self) -> list[dict]:
        """Every executor Job in the namespace."""
        found = await self.call(
            self.batch.list_namespaced_job,
            self.namespace,
            label_selector=f"{objects.APP_LABEL}={objects.APP}",
        )
        return found.get("items", [])

    async def job_events(self, name: str) -> list[dict]:
        """The events of the Job ``name`` (why it could not create its pod, say)."""
        found = await self.call(
            self.core.list_namespaced_event,
            self.namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind=Job",
        )
        return found.get("items", [])

    async def open_log(self, pod_name: str, *, follow: bool) -> Any:
        """The log of the pod's container as an HTTP response to read (``.content``) and
        release. Bounded while it opens; a followed log then stays open while the
        container runs (it may be quiet), a whole log while data keeps coming."""
        import aiohttp

        read = None if follow else self.request_timeout
        timeout = aiohttp.ClientTimeout(
            connect=self.request_timeout, sock_connect=self.request_timeout, sock_read=read
        )
        call = self.core.read_namespaced_pod_log(
            pod_name, self.namespace, container="cell", follow=follow,
            _preload_content=False, _request_timeout=timeout,
        )  # fmt: skip
        try:
            return await asyncio.wait_for(raw(call), self.request_timeout)
        except asyncio.TimeoutError as e:
            raise self._timed_out(f"the log of pod {pod_name}") from e

    async def read_log(self, pod_name: str) -> str:
        """The pod's log so far, as text."""
        resp = await self.open_log(pod_name, follow=False)
        try:
            return (await resp.read()).decode(errors="replace")
        finally:
            resp.release()

    async def attach_stdin(self, pod_name: str) -> Any:
        """A websocket attached to the stdin of the pod's container (bounded while it
        opens; the websocket client takes no request timeout)."""
        from kubernetes_asyncio import client

        api = client.CoreV1Api(self.ws_api())

        async def attach() -> Any:
            # typed as returning str; over the WebSocket client it is the connection's awaitable
            connect: Any = await api.connect_get_namespaced_pod_attach(
                pod_name, self.namespace, container="cell",
                stdin=True, stdout=False, stderr=False, tty=False, _preload_content=False,
            )  # fmt: skip
            return await connect

        return await asyncio.wait_for(attach(), self.request_timeout)

    async def network_policy(self) -> dict:
        """crucible's deny-all NetworkPolicy (ApiException 404 when missing)."""
        return await self.call(
            self.networking.read_namespaced_network_policy, objects.POLICY_NAME, self.namespace
        )

    async def services(self) -> dict:
        """Every Service of the cluster (the doctor probes their node ports)."""
        return await self.call(self.core.list_service_for_all_namespaces)

    # ----- setting up -----------------------------------------------------------------

    async def _ensure_network_policy(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        if self.create_namespace:
            try:
                await self.call(self.core.create_namespace, {"metadata": {"name": self.namespace}})
                self.log.info("crucible: created namespace %s", self.namespace)
            except ApiException as e:
                if e.status not in (403, 409):  # exists, or not ours to create
                    msg = f"cannot create namespace {self.namespace!r}: {e.reason}"
                    raise Unavailable(msg) from e
            except asyncio.TimeoutError as e:
                raise self._timed_out("the creation of the namespace") from e
        body = objects.make_network_policy()
        try:
            await self.call(self.networking.create_namespaced_network_policy, self.namespace, body)
        except ApiException as e:
            if e.status == 409:
                return
            if e.status == 404:
                raise Unavailable(
                    f"namespace {self.namespace!r} does not exist; create it or set"
                    " c.CrucibleKubernetesBackend.namespace"
                ) from e
            raise Unavailable(f"cannot ensure the deny-all NetworkPolicy: {e.reason}") from e
        except asyncio.TimeoutError as e:
            raise self._timed_out("the creation of the NetworkPolicy") from e

    async def _find_api_endpoint(self) -> str | None:
        """Every address of the API server as pods see it, IPv4 and IPv6 (the `kubernetes`
        EndpointSlices, else its Endpoints), as ``HOST:PORT,[V6]:PORT``."""
        from kubernetes_asyncio import client

        found: list[tuple[str, int]] = []
        problems = []
        try:
            slices = await self.call(
                client.DiscoveryV1Api(self.api).list_namespaced_endpoint_slice,
                "default",
                label_selector="kubernetes.io/service-name=kubernetes",
            )
            for item in slices.get("items", []):
                ports = [p["port"] for p in item.get("ports") or [] if p.get("port")]
                for endpoint in item.get("endpoints") or []:
                    found += [(a, p) for a in endpoint.get("addresses", []) for p in ports]
        except Exception as e:  # noqa: BLE001 -- reported below with the other source's failure
            problems.append(f"EndpointSlices: {e!r}")
        try:
            endpoints = await self.call(
                self.core.read_namespaced_endpoints, "kubernetes", "default"
            )
            for subset in endpoints.get("subsets") or []:
                ports = [p["port"] for p in subset.get("ports") or []]
                found += [(a["ip"], p) for a in subset.get("addresses") or [] for p in ports]
        except Exception as e:  # noqa: BLE001 -- reported below with the other source's failure
            problems.append(f"Endpoints: {e!r}")
        targets = sorted({f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in found})
        if not targets:
            self.log.warning(
                "crucible: cannot find the API server's address for the isolation probe (%s);"
                " set c.CrucibleKubernetesBackend.isolation_probe",
                "; ".join(problems) or "no addresses",
            )
        return ",".join(targets) or None


def api_message(e: Any) -> str:
    """The API server's message in an ApiException (its reason when there is none)."""
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "reason", e))
