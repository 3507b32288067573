"""How an executor pod's log is read when the kubelet ends a followed log early.

The kubelet ends a followed log once it finds the container exited; under load it has been
seen to do so before the container's log file held what the runner wrote (50 concurrent
cells: one succeeded with no output recorded). The sandbox then reads the log whole again
until the runner's last frame is there, a bounded number of times.

``KubeletEndingLogsEarly`` models that failure: the first followed log it serves is empty
and ends, while the pod already says its container exited; the whole log holds everything.
The pod watch is the real ``PodReflector``, fed the pod's states directly.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from crucible_jupyter.backends.base import FRAMES
from crucible_jupyter.backends.kubernetes import objects, sandbox
from crucible_jupyter.backends.kubernetes.reflector import PodReflector
from crucible_jupyter.backends.kubernetes.sandbox import Following, KubernetesSandbox
from crucible_jupyter.models import Execution, ExecutionRequest

EXECUTION_ID = "01a20000-0000-7000-8000-0000000000aa"
STDOUT = b'{"v":1,"seq":0,"t":1,"type":"stream","name":"stdout","text":"cell 21\\n"}'
END = b'{"v":1,"seq":1,"t":2,"type":"end","exit_code":0}'


class Response:
    """An HTTP response whose body is ``data``, read through a real StreamReader."""

    def __init__(self, data: bytes) -> None:
        self.content = asyncio.StreamReader()
        self.content.feed_data(data)
        self.content.feed_eof()

    def release(self) -> None:
        pass


class KubeletEndingLogsEarly:
    """A cluster whose followed logs end at once, empty (the kubelet ended the stream
    before the log file held the runner's output); a whole log holds ``log``."""

    def __init__(self, log: bytes) -> None:
        self.log = logging.getLogger("test")
        self.pods = self.reflector = PodReflector(None, "ns", "app=crucible")
        self.whole_log = log
        self.opened: list[bool] = []  # follow flag of each log opened

    async def open_log(self, pod_name: str, *, follow: bool) -> Response:
        self.opened.append(follow)
        return Response(b"" if follow else self.whole_log)

    def later(self, coro: Any) -> None:
        coro.close()

    async def delete(self, name: str, grace: int | None = None) -> None:
        pass


def _exited_pod(exit_code: int) -> dict:
    return {
        "metadata": {
            "name": "crucible-pod",
            "labels": {objects.EXECUTION_LABEL: objects.label_value(EXECUTION_ID)},
            "creationTimestamp": "2026-12-05T00:00:00Z",
        },
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": "cell", "state": {"terminated": {"exitCode": exit_code}}}
            ],
        },
    }


async def _read(log: bytes, exit_code: int = 0) -> tuple[list[bytes], KubeletEndingLogsEarly]:
    cluster = KubeletEndingLogsEarly(log)
    execution = Execution(id=EXECUTION_ID, user="alice", request=ExecutionRequest(code="x"))
    box = KubernetesSandbox(
        cluster, Following("fail", 60.0, 1 << 20), execution, "crucible-job",  # type: ignore[arg-type]
        isolation="kubernetes",
    )  # fmt: skip
    cluster.pods._store(_exited_pod(exit_code))
    lines = [line async for kind, line, _ in box.lines() if kind == FRAMES]
    return lines, cluster


def test_a_log_ended_early_is_read_whole_until_the_end_frame():
    lines, cluster = asyncio.run(_read(STDOUT + b"\n" + END + b"\n"))
    assert lines == [STDOUT, END]
    assert cluster.opened == [True, False]


def test_a_log_without_an_end_frame_is_read_again_a_bounded_number_of_times():
    """A runner killed by a signal never writes its end frame: what it wrote is delivered
    once, and reading stops after WHOLE_READS whole reads."""
    lines, cluster = asyncio.run(_read(STDOUT + b"\n", exit_code=137))
    assert lines == [STDOUT]
    assert cluster.opened == [True] + [False] * sandbox.WHOLE_READS
