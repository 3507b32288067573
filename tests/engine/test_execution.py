"""Cells run through the real dispatcher and the real bubblewrap sandbox, on both databases."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from crucible_jupyter.errors import Conflict, InvalidRequest
from crucible_jupyter.models import Status
from tests.helpers.engine import run_cell, statuses, stream_text


async def test_print_succeeds_isolated_and_recorded(make_dispatcher, db_url):
    d = await make_dispatcher(db_url=db_url)
    execution, events = await run_cell(d, "print('hello')", tags=["demo"], name="first")
    assert execution.status is Status.SUCCEEDED
    assert execution.exit_code == 0
    assert execution.isolation == "bubblewrap"
    assert stream_text(events, "stdout") == "hello\n"
    assert statuses(events) == ["queued", "starting", "running", "succeeded"]
    assert [e.seq for e in events] == list(range(len(events)))
    stored = await d.events(execution.id)
    assert [e.to_dict() for e in stored] == [e.to_dict() for e in events]
    assert (await d.get(execution.id)).status is Status.SUCCEEDED
    page, _ = await d.list(tag="demo")
    assert [e.id for e in page] == [execution.id]
    assert page[0].started_at <= page[0].finished_at


async def test_stdout_stderr_interleaving_kept(dispatcher):
    code = textwrap.dedent("""
        import sys
        for i in range(50):
            print(f"out {i}")
            print(f"err {i}", file=sys.stderr)
    """)
    execution, events = await run_cell(dispatcher, code)
    streams = [(e.data["name"], e.data["text"]) for e in events if e.type == "stream"]
    joined = [(name, line) for name, text in streams for line in text.splitlines()]
    expected = [(n, f"{n[3:]} {i}") for i in range(50) for n in ("stdout", "stderr")]
    assert joined == expected


async def test_subprocess_and_fd_writes_captured(dispatcher):
    code = textwrap.dedent("""
        import os, subprocess
        print("before")
        subprocess.run(["echo", "from echo"])
        os.write(1, b"raw fd one\\n")
        os.write(2, b"raw fd two\\n")
        print("after")
    """)
    execution, events = await run_cell(dispatcher, code)
    assert execution.status is Status.SUCCEEDED
    assert stream_text(events, "stdout") == "before\nfrom echo\nraw fd one\nafter\n"
    assert stream_text(events, "stderr") == "raw fd two\n"


@pytest.mark.parametrize(
    ("code", "status", "exit_code"),
    [
        ("print('bye'); import sys; sys.exit(0)", Status.SUCCEEDED, 0),
        ("print('bye'); import sys; sys.exit(3)", Status.FAILED, 3),
        ("print('bye'); import os; os._exit(1)", Status.FAILED, 1),
    ],
)
async def test_instant_exits_keep_output_and_code(dispatcher, code, status, exit_code):
    execution, events = await run_cell(dispatcher, code)
    assert (execution.status, execution.exit_code) == (status, exit_code)
    assert stream_text(events, "stdout") == "bye\n"
    assert execution.finished_at is not None


async def test_syntax_and_import_errors_are_error_frames(dispatcher):
    execution, events = await run_cell(dispatcher, "x = (1,\nprint(x")
    assert execution.status is Status.FAILED
    errors = [e for e in events if e.type == "error"]
    assert errors
    assert errors[0].data["ename"] == "SyntaxError"
    execution, events = await run_cell(dispatcher, "import no_such_module_here")
    assert execution.status is Status.FAILED
    (error,) = [e for e in events if e.type == "error"]
    assert error.data["ename"] == "ModuleNotFoundError"
    assert "no_such_module_here" in error.data["evalue"]
    assert "ModuleNotFoundError" in execution.reason


async def test_last_expression_and_exception(dispatcher):
    execution, events = await run_cell(dispatcher, "x = 6\nx * 7")
    (result,) = [e for e in events if e.type == "execute_result"]
    assert result.data["data"]["text/plain"] == "42"
    execution, events = await run_cell(dispatcher, "def f():\n    raise ValueError('bad')\nf()")
    assert execution.status is Status.FAILED
    (error,) = [e for e in events if e.type == "error"]
    assert (error.data["ename"], error.data["evalue"]) == ("ValueError", "bad")
    assert any("raise ValueError" in line for line in error.data["traceback"])
    assert execution.reason == "ValueError: bad"


async def test_unicode_round_trips_or_is_replaced_visibly(make_dispatcher, db_url):
    d = await make_dispatcher(db_url=db_url)
    code = textwrap.dedent("""
        import os
        print("emoji 🎉🐍")
        print("rtl שלום مرحبا")
        print("combining é")
        print("lone \\ud800 surrogate")
        os.write(1, b"bad bytes \\xff\\xfe end\\n")
    """)
    execution, events = await run_cell(d, code)
    assert execution.status is Status.SUCCEEDED
    text = stream_text(events, "stdout")
    assert "emoji 🎉🐍\n" in text
    assert "rtl שלום مرحبا\n" in text
    assert "combining é\n" in text
    assert "\\ud800" in text  # visible, not crashed
    assert "bad bytes \ufffd\ufffd end" in text
    stored = stream_text(await d.events(execution.id), "stdout")
    assert stored == text


async def test_twenty_concurrent_executions_all_finish(make_dispatcher, db_url):
    d = await make_dispatcher(db_url=db_url, max_concurrency=4)
    executions = [
        await d.submit({"code": f"import time; time.sleep(0.05); print({i})"}) for i in range(20)
    ]
    finals = await asyncio.gather(*(d.wait(e.id) for e in executions))
    assert [f.status for f in finals] == [Status.SUCCEEDED] * 20
    for i, e in enumerate(executions):
        assert stream_text(await d.events(e.id), "stdout") == f"{i}\n"
    page, _ = await d.list(status=["queued", "starting", "running"])
    assert page == []


@pytest.mark.parametrize("code", ["while True: pass", "import time; time.sleep(1000)"])
async def test_timeout_kills(dispatcher, code):
    execution, events = await run_cell(
        dispatcher, f"print('started', flush=True)\n{code}", timeout=1.5
    )
    assert execution.status is Status.TIMED_OUT
    assert execution.reason == "timed out after 1.5 s"
    assert stream_text(events, "stdout") == "started\n"


async def test_timeout_kills_the_whole_process_tree(dispatcher):
    code = textwrap.dedent("""
        import subprocess
        subprocess.Popen(["sleep", "987654"])
        subprocess.Popen(["sh", "-c", "sleep 987655 & sleep 987656"])
        import time; time.sleep(1000)
    """)
    execution, _ = await run_cell(dispatcher, code, timeout=1)
    assert execution.status is Status.TIMED_OUT
    await asyncio.sleep(0.3)
    import subprocess

    left = subprocess.run(
        ["pgrep", "-f", "sleep 98765[456]"], capture_output=True, text=True
    ).stdout
    assert left.strip() == ""


async def test_cancel_while_queued_and_while_running(make_dispatcher):
    d = await make_dispatcher(max_concurrency=1, cancel_grace_seconds=2.0)
    running = await d.submit({"code": "import time\nprint('go', flush=True)\ntime.sleep(100)"})
    queued = await d.submit({"code": "print('never')"})
    events = d.subscribe(running.id)
    async for event in events:
        if event.type == "stream":
            break
    cancelled = await d.cancel(queued.id)
    assert cancelled.status is Status.CANCELLED
    assert stream_text(await d.events(queued.id)) == ""
    final = await d.cancel(running.id)
    assert final.status is Status.CANCELLED
    errors = [e for e in await d.events(running.id) if e.type == "error"]
    assert errors
    assert errors[0].data["ename"] == "KeyboardInterrupt"
    with pytest.raises(Conflict, match="already cancelled"):
        await d.cancel(running.id)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("raise KeyboardInterrupt('stop here')", "KeyboardInterrupt: stop here"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGINT)", "KeyboardInterrupt"),
    ],
)
async def test_a_cell_interrupting_itself_is_named_by_its_exception(dispatcher, code, reason):
    # not "killed by SIGINT": nothing killed it, the cell ended with an exception
    execution, _ = await run_cell(dispatcher, code)
    assert execution.status is Status.FAILED
    assert execution.reason == reason


async def test_cancel_kills_a_cell_that_ignores_interrupts(make_dispatcher):
    d = await make_dispatcher(cancel_grace_seconds=0.5)
    code = textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stubborn", flush=True)
        time.sleep(100)
    """)
    execution = await d.submit({"code": code})
    async for event in d.subscribe(execution.id):
        if event.type == "stream":
            break
    final = await d.cancel(execution.id)
    assert final.status is Status.CANCELLED


async def test_priority_order_under_saturation(make_dispatcher):
    d = await make_dispatcher(max_concurrency=1, aging_seconds=3600)
    blocker = await d.submit({"code": "import time; time.sleep(1)"})
    low = await d.submit({"code": "pass", "priority": "low"})
    normal = await d.submit({"code": "pass", "priority": "normal"})
    high = await d.submit({"code": "pass", "priority": "high"})
    assert d.queue_status(high.id)["position"] == 1
    assert d.queue_status(low.id)["position"] == 3
    finals = [await d.wait(e.id) for e in (blocker, low, normal, high)]
    order = sorted(finals[1:], key=lambda e: e.started_at)
    assert [e.id for e in order] == [high.id, normal.id, low.id]


async def test_aging_lets_low_priority_through(make_dispatcher):
    d = await make_dispatcher(max_concurrency=1, aging_seconds=0.2)
    blocker = await d.submit({"code": "import time; time.sleep(1)"})
    low = await d.submit({"code": "pass", "priority": "low"})
    await asyncio.sleep(0.6)  # low has aged past two levels
    high = await d.submit({"code": "pass", "priority": "high"})
    await d.wait(blocker.id)
    low_f, high_f = await d.wait(low.id), await d.wait(high.id)
    assert low_f.started_at <= high_f.started_at


async def test_per_user_limit(make_dispatcher):
    d = await make_dispatcher(max_concurrency=4, max_concurrency_per_user=1)
    a1 = await d.submit({"code": "import time; time.sleep(0.5)"}, user="alice")
    a2 = await d.submit({"code": "pass"}, user="alice")
    b1 = await d.submit({"code": "pass"}, user="bob")
    finals = {e.id: await d.wait(e.id) for e in (a1, a2, b1)}
    assert finals[b1.id].finished_at < finals[a1.id].finished_at
    assert finals[a2.id].started_at >= finals[a1.id].finished_at


async def test_output_streams_while_the_cell_runs(dispatcher):
    execution = await dispatcher.submit(
        {"code": "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')"}
    )
    async for event in dispatcher.subscribe(execution.id):
        if event.type == "stream":
            assert event.data["text"] == "first\n"
            current = await dispatcher.get(execution.id)
            assert current.status is Status.RUNNING  # arrived while still running
            break
    assert (await dispatcher.wait(execution.id)).status is Status.SUCCEEDED


async def test_late_subscriber_resumes_from_seq(dispatcher):
    execution, events = await run_cell(dispatcher, "for i in range(5): print(i)")
    replay = [e async for e in dispatcher.subscribe(execution.id, after=2)]
    assert [e.seq for e in replay] == [e.seq for e in events if e.seq > 2]
    live = await dispatcher.submit(
        {"code": "import time\nfor i in range(3):\n print(i, flush=True)\n time.sleep(0.3)"}
    )
    await asyncio.sleep(0.5)
    late = [e async for e in dispatcher.subscribe(live.id)]
    assert [e.seq for e in late] == list(range(len(late)))
    assert stream_text(late) == "0\n1\n2\n"


async def test_forged_frames_do_not_change_status(dispatcher):
    code = textwrap.dedent("""
        import os, sys
        os.write(1, b'{"v":1,"seq":99,"type":"end","exit_code":0}\\n')
        print('{"type":"status","status":"succeeded"}')
        sys.exit(5)
    """)
    execution, events = await run_cell(dispatcher, code)
    assert execution.status is Status.FAILED
    assert execution.exit_code == 5
    assert statuses(events)[-1] == "failed"


async def test_rich_display_and_environment(dispatcher):
    code = textwrap.dedent("""
        import os
        class Bold:
            def _repr_html_(self):
                return "<b>bold</b>"
        display(Bold())
        print(os.environ["GREETING"])
    """)
    execution, events = await run_cell(dispatcher, code, env={"GREETING": "hi there"})
    assert execution.status is Status.SUCCEEDED
    (shown,) = [e for e in events if e.type == "display_data"]
    assert shown.data["data"]["text/html"] == "<b>bold</b>"
    assert stream_text(events, "stdout") == "hi there\n"


async def test_a_backend_without_a_cluster_refuses_before_storing(make_dispatcher, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    d = await make_dispatcher(kubernetes={"kubeconfig": "/nonexistent/kubeconfig"})
    # a 400 (the request's backend cannot serve here; retrying will not help), not a 503
    with pytest.raises(InvalidRequest, match="kubeconfig '/nonexistent/kubeconfig' does not") as e:
        await d.submit({"code": "print(1)", "backend": "kubernetes"})
    assert e.value.field == "backend"
    assert "run on backend 'local'" in e.value.message
    assert (await d.list())[0] == []


async def test_a_sandbox_that_ends_without_running_the_cell_is_not_a_success(make_dispatcher):
    # a runner that exits 0 before its start frame never had the cell: a warm pod whose
    # stdin closed first does this. NeverStartsRunner models that failure.
    folder = Path(tempfile.mkdtemp(prefix="crucible-test-"))  # readable by the sandbox user
    try:
        folder.chmod(0o755)
        never_starts = folder / "never_starts_runner.py"
        never_starts.write_text("raise SystemExit(0)\n")
        never_starts.chmod(0o644)
        d = await make_dispatcher(local={"warm_sandboxes": 0})
        d.get_backend("local").__dict__["runner_path"] = str(never_starts)
        execution, _ = await run_cell(d, "print('never runs')")
    finally:
        shutil.rmtree(folder)
    assert execution.status is Status.FAILED, execution
    assert execution.reason == (
        "the sandbox ended without running the cell (its runner never started)"
    )


async def test_a_stream_after_the_last_stored_seq_gets_the_recorded_end(dispatcher):
    # a client that followed a dispatcher killed before it stored its last events holds a
    # seq the restarted one never stored: it must still get the end, not a silent close
    execution, _ = await run_cell(dispatcher, "print('x')")
    stored = await dispatcher.events(execution.id)
    assert stored[-1].seq < 1000
    got = [e async for e in dispatcher.subscribe(execution.id, after=1000)]
    assert [(e.type, e.data.get("status")) for e in got] == [("status", "succeeded")]
    assert got[0].seq == stored[-1].seq
    # the ordinary case is unchanged: after any earlier seq, the events that follow it
    got = [e async for e in dispatcher.subscribe(execution.id, after=stored[-2].seq)]
    assert [e.seq for e in got] == [stored[-1].seq]
