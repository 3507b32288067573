"""One shared list+watch of the executor pods of a namespace (kubespawner's reflector model).

Every execution waits on this single watch instead of polling: the reflector keeps the
latest copy of each pod and wakes whoever waits on that execution when it changes. It
lists, then watches from the list's resourceVersion; an expired version (410) relists,
other errors reconnect with exponential backoff; cancellation is re-raised.

Deleted pods: the last state of a pod is kept (:attr:`PodReflector.gone`) only for an
execution someone holds (:meth:`~PodReflector.hold`), until it is released: the sandbox of an
execution holds it from its start to its outcome. A pod deleted after that (a cold Job is
deleted once its outcome is recorded) leaves nothing behind, so what the reflector keeps
is bounded by the pods in the namespace and the executions running, not by how many ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from .api import raw_json
from .objects import EXECUTION_LABEL
from .pods import Pod

#: Seconds the API server keeps one watch open before the reflector opens the next.
WATCH_SECONDS = 240


class PodReflector:
    """Latest state of every pod matching ``label_selector`` in ``namespace``."""

    def __init__(
        self,
        core_api: Any,
        namespace: str,
        label_selector: str,
        log: logging.Logger | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.core = core_api
        self.namespace = namespace
        self.label_selector = label_selector
        self.log = log or logging.getLogger(__name__)
        #: bound of the list call, and of connecting; a watch that says nothing for
        #: WATCH_SECONDS plus this is dropped and opened again
        self.request_timeout = request_timeout
        self.pods: dict[str, Pod] = {}  # pod name -> pod (raw API dict)
        self.gone: dict[str, Pod] = {}  # last state of deleted pods of held executions
        self._held: set[str] = set()  # execution labels whose deleted pod is kept
        self._changed: dict[str, asyncio.Event] = {}  # execution label -> event
        self._waiting: dict[str, int] = {}  # execution label -> how many wait on its event
        #: called with every pod that changes or goes (e.g. the warm pool, to refill)
        self.listeners: list[Callable[[Pod], None]] = []
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Start watching; returns once the first list has arrived."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="crucible-pod-reflector")
        waiter = asyncio.ensure_future(self.ready.wait())
        done, _ = await asyncio.wait([waiter, self._task], return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # raise what stopped it

    async def stop(self) -> None:
        """Stop watching (bounded: the watch is cancelled, not drained)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 5)
            self._task = None

    async def _list(self) -> str:
        body = await raw_json(
            self.core.list_namespaced_pod(
                self.namespace,
                label_selector=self.label_selector,
                _preload_content=False,
                _request_timeout=self.request_timeout,
            )
        )
        pods = {p["metadata"]["name"]: p for p in body.get("items", [])}
        for name in set(self.pods) - set(pods):
            self._forget(self.pods[name])
        for pod in pods.values():
            self._store(pod)
        return body["metadata"]["resourceVersion"]

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                version = await self._list()
                self.ready.set()
                while True:
                    w = watch.Watch()
                    async with w.stream(
                        self.core.list_namespaced_pod,
                        self.namespace,
                        label_selector=self.label_selector,
                        resource_version=version,
                        timeout_seconds=WATCH_SECONDS,
                        allow_watch_bookmarks=True,
                        _request_timeout=self._watch_timeout(),
                    ) as stream:
                        async for event in stream:
                            obj = event["raw_object"]
                            version = obj["metadata"].get("resourceVersion", version)
                            if event["type"] == "DELETED":
                                self._forget(obj)
                            elif event["type"] in ("ADDED", "MODIFIED"):
                                self._store(obj)
                    delay = 0.5
            except asyncio.CancelledError:
                raise
            except ApiException as e:
                if e.status == 410:  # our version is too old: list again
                    self.log.debug("crucible: pod watch expired, relisting")
                    continue
                self.log.warning("crucible: pod watch failed (%s); retrying in %.1fs", e, delay)
            except Exception as e:  # noqa: BLE001 -- the watch outlives any failure: logged, retried
                self.log.warning("crucible: pod watch failed (%r); retrying in %.1fs", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)

    def _watch_timeout(self) -> tuple[float, float] | None:
        """(connect, read) bounds of a watch: a server that stops talking is left."""
        if not self.request_timeout:
            return None
        return (self.request_timeout, WATCH_SECONDS + self.request_timeout)

    def hold(self, execution_label: str) -> None:
        """Keep the last state of the execution's pod once it is deleted (``gone``), until
        :meth:`release`: its sandbox reads the outcome from it."""
        self._held.add(execution_label)

    def release(self, execution_label: str) -> None:
        """Forget the execution: its deleted pod's state, and any later one."""
        self._held.discard(execution_label)
        self.gone.pop(execution_label, None)
        event = self._changed.pop(execution_label, None)
        if event is not None:
            event.set()  # whoever still waits on it looks again (and waits anew)

    def retained(self) -> dict[str, int]:
        """How many entries each of the reflector's maps holds (bounded: see the module)."""
        return {
            "pods": len(self.pods),
            "gone": len(self.gone),
            "held": len(self._held),
            "waits": len(self._changed),
        }

    def _key(self, pod: Pod) -> str | None:
        return (pod["metadata"].get("labels") or {}).get(EXECUTION_LABEL)

    def _store(self, pod: Pod) -> None:
        self.pods[pod["metadata"]["name"]] = pod
        self._wake(self._key(pod))
        self._tell(pod)

    def _forget(self, pod: Pod) -> None:
        self.pods.pop(pod["metadata"]["name"], None)
        key = self._key(pod)
        if key in self._held:
            self.gone[key] = pod
        self._wake(key)
        self._tell(pod)

    def _tell(self, pod: Pod) -> None:
        for listener in self.listeners:
            try:
                listener(pod)
            except Exception:  # a listener's bug must not stop the watch
                self.log.exception("crucible: pod listener failed")

    def _wake(self, key: str | None) -> None:
        if key and key in self._changed:
            self._changed.pop(key).set()

    def pod_for(self, execution_label: str) -> Pod | None:
        """The newest pod of an execution, if the watch has seen one."""
        pods = [p for p in self.pods.values() if self._key(p) == execution_label]
        return max(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")) if pods else None

    async def wait_for(
        self, execution_label: str, check: Callable[[Pod | None], Any], timeout: float | None = None
    ) -> Any:
        """Wait until ``check(pod)`` returns something truthy; return it.

        ``check`` sees the current pod (None while there is none) on every change of it.
        Raises TimeoutError after ``timeout`` seconds. Nothing of the wait is kept after it.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            result = check(self.pod_for(execution_label))
            if result:  # (nothing can change between this check and the wait below)
                return result
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            changed = self._changed.setdefault(execution_label, asyncio.Event())
            self._waiting[execution_label] = self._waiting.get(execution_label, 0) + 1
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                raise TimeoutError from None
            finally:
                self._waiting[execution_label] -= 1
                if not self._waiting[execution_label]:  # the last one waiting on it
                    del self._waiting[execution_label]
                    if self._changed.get(execution_label) is changed:
                        del self._changed[execution_label]
