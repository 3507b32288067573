"""The cell runner, run as a real subprocess exactly as sandboxes and pods run it."""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runner import (
    PYTHON,
    RUNNER,
    TIMEOUT,
    check_frames,
    parse_frames,
    run_cell,
    runner_python_has,
    write_cell,
)


class LiveRunner:
    """The runner with frames read one line at a time while it runs."""

    def __init__(self, tmp_path: Path, code: str):
        cmd = [PYTHON, str(RUNNER), "--code-file", str(write_cell(tmp_path, code))]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.frames: list[dict] = []

    def next_frame(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the runner ended early"
        self.frames.append(json.loads(line.decode("utf-8")))
        return self.frames[-1]

    def wait_for(self, type_: str) -> dict:
        while True:
            frame = self.next_frame()
            if frame["type"] == type_:
                return frame

    def finish(self) -> int:
        rest = self.proc.stdout.read()  # not communicate(): it skips what readline() buffered
        self.proc.communicate(timeout=TIMEOUT)
        if rest:
            self.frames.extend(parse_frames(rest))
        check_frames(self.frames, self.proc.returncode)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def live(tmp_path):
    runners: list[LiveRunner] = []

    def start(code: str) -> LiveRunner:
        runners.append(LiveRunner(tmp_path, code))
        return runners[-1]

    yield start
    for runner in runners:
        runner.close()


# --- basics ---------------------------------------------------------------------------------


def test_print_becomes_a_stream_frame(tmp_path):
    result = run_cell(tmp_path, "print(1)\n")
    assert result.returncode == 0
    assert [(f["type"], f.get("name"), f.get("text")) for f in result.frames] == [
        ("start", None, None),
        ("stream", "stdout", "1\n"),
        ("end", None, None),
    ]
    start = result.frames[0]
    assert start["python"].count(".") == 2
    assert isinstance(start["pid"], int)
    assert result.stderr == b""


def test_runner_parses_as_python_3_8():
    source = RUNNER.read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 8))
    assert "import crucible_jupyter" not in source
    assert "from crucible_jupyter" not in source


def test_bad_command_line_exits_2_without_frames(tmp_path):
    proc = subprocess.run(
        [PYTHON, str(RUNNER), "--code-file", str(tmp_path / "missing.py")],
        capture_output=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert b"missing.py" in proc.stderr


def test_stdin_devnull_is_fine(tmp_path):
    path = write_cell(tmp_path, "print('ok')\n")
    proc = subprocess.run(
        [PYTHON, str(RUNNER), "--code-file", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT,
    )
    frames = parse_frames(proc.stdout)
    check_frames(frames, 0)
    assert frames[1]["text"] == "ok\n"


def test_cell_environment(tmp_path):
    code = (
        "import os, sys\n"
        "print(__name__, sys.argv, os.environ['MPLBACKEND'])\n"
        "print(sys.stdout.isatty(), sys.stdout.fileno(), sys.stderr.fileno())\n"
        "print(sys.stdout.encoding, sys.stdout.writable(), sys.stdout.write('x'))\n"
        "print(len(sys.stdin.read()))\n"
    )
    result = run_cell(tmp_path, code)
    assert result.text("stdout") == "__main__ ['<cell>'] Agg\nFalse 1 2\nxutf-8 True 1\n0\n"


def test_frame_channel_does_not_leak_into_the_cell(tmp_path):
    code = (
        "import os\n"
        "for fd in sorted(int(n) for n in os.listdir('/proc/self/fd')):\n"
        "    try:\n"
        "        print(fd, os.readlink('/proc/self/fd/%d' % fd))\n"
        "    except OSError:\n"
        "        pass\n"
    )
    path = write_cell(tmp_path, code)
    proc = subprocess.Popen(
        [PYTHON, str(RUNNER), "--code-file", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    frame_pipe = f"pipe:[{os.fstat(proc.stdout.fileno()).st_ino}]"
    out, _ = proc.communicate(timeout=TIMEOUT)
    frames = parse_frames(out)
    check_frames(frames, 0)
    listing = "".join(f["text"] for f in frames if f["type"] == "stream")
    assert frame_pipe not in listing
    assert listing.startswith("0 /dev/null\n")


# --- ordering -------------------------------------------------------------------------------


def test_stdout_and_stderr_keep_their_order(tmp_path):
    code = (
        "import sys\n"
        "for i in range(100):\n"
        "    print('out', i)\n"
        "    print('err', i, file=sys.stderr)\n"
    )
    result = run_cell(tmp_path, code)
    expected = []
    for i in range(100):
        expected += [("stdout", f"out {i}"), ("stderr", f"err {i}")]
    assert result.streams() == expected


def test_subprocess_and_os_write_are_captured_in_order(tmp_path):
    code = (
        "import os, subprocess, sys\n"
        "for i in range(20):\n"
        "    print('print', i)\n"
        "    subprocess.run(['echo', 'echo %d' % i])\n"
        "    print('print-after', i)\n"
        "    os.write(1, b'write %d\\n' % i)\n"
        "    sys.stderr.write('err %d\\n' % i)\n"
        "    os.write(2, b'write-err %d\\n' % i)\n"
    )
    result = run_cell(tmp_path, code)
    expected = []
    for i in range(20):
        expected += [
            ("stdout", f"print {i}"),
            ("stdout", f"echo {i}"),
            ("stdout", f"print-after {i}"),
            ("stdout", f"write {i}"),
            ("stderr", f"err {i}"),
            ("stderr", f"write-err {i}"),
        ]
    assert result.streams() == expected


def test_c_level_output_is_captured(tmp_path):
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.puts(b'from C')\n"
        "libc.fflush(None)\n"
        "os.system('echo from shell >&2')\n"
        "libc.puts(b'unflushed at exit')\n"
    )
    result = run_cell(tmp_path, code)
    assert result.text("stdout") == "from C\nunflushed at exit\n"
    assert result.text("stderr") == "from shell\n"


def test_output_arrives_while_the_cell_still_runs(live):
    runner = live("import time\nprint('early')\ntime.sleep(3)\nprint('late')\n")
    frame = runner.wait_for("stream")
    assert frame["text"] == "early\n"
    assert runner.proc.poll() is None  # read before the process ended
    assert runner.finish() == 0
    assert runner.frames[-2]["text"] == "late\n"


def test_partial_lines_are_sent_without_waiting_for_a_newline(live):
    runner = live("import time\nprint('50%', end='\\r')\ntime.sleep(3)\nprint('done')\n")
    frame = runner.wait_for("stream")
    assert frame["text"] == "50%\r"
    assert runner.proc.poll() is None
    assert runner.finish() == 0


def test_big_write_is_split_and_complete(tmp_path):
    code = (
        "import os, sys\n"
        "sys.stdout.write('x' * 5_000_000)\n"
        "sys.stdout.flush()\n"
        "os.write(2, 'é'.encode() * 2_500_000)\n"
    )
    result = run_cell(tmp_path, code, "--max-frame-text", "100000")
    streams = result.of("stream")
    assert all(len(f["text"]) <= 100_000 for f in streams)
    assert result.text("stdout") == "x" * 5_000_000
    assert result.text("stderr") == "é" * 2_500_000


# --- rich output ----------------------------------------------------------------------------


def test_last_expression_becomes_execute_result(tmp_path):
    result = run_cell(tmp_path, "x = 20\nx * 2 + 2\n")
    assert [f["data"] for f in result.of("execute_result")] == [{"text/plain": "42"}]


def test_semicolon_and_none_suppress_the_result(tmp_path):
    assert run_cell(tmp_path, "1 + 1;\n").of("execute_result") == []
    assert run_cell(tmp_path, "None\n").of("execute_result") == []


def test_top_level_await(tmp_path):
    code = "import asyncio\nawait asyncio.sleep(0)\nasync def f():\n    return 7\nawait f()\n"
    result = run_cell(tmp_path, code)
    assert result.returncode == 0
    assert result.of("execute_result")[0]["data"] == {"text/plain": "7"}


def test_display_uses_repr_html(tmp_path):
    code = (
        "class Fancy:\n"
        "    def _repr_html_(self):\n"
        "        return '<i>fancy</i>'\n"
        "    def __repr__(self):\n"
        "        return 'Fancy()'\n"
        "display(Fancy())\n"
        "clear_output(wait=True)\n"
    )
    result = run_cell(tmp_path, code)
    [shown] = result.of("display_data")
    assert shown["data"]["text/html"] == "<i>fancy</i>"
    assert shown["data"]["text/plain"] == "Fancy()"
    assert [f["wait"] for f in result.of("clear_output")] == [True]


def test_ipython_display_is_routed_to_frames(tmp_path):
    if not runner_python_has("IPython.display"):
        pytest.skip(f"IPython cannot be imported by {PYTHON}")
    code = (
        "from IPython.display import display, HTML, Markdown\n"
        "display(HTML('<b>x</b>'))\n"
        "import IPython.display\n"
        "IPython.display.display(Markdown('*y*'))\n"
        "HTML('<p>last</p>')\n"
    )
    result = run_cell(tmp_path, code)
    assert result.returncode == 0, result.frames
    html, markdown = result.of("display_data")
    assert html["data"]["text/html"] == "<b>x</b>"
    assert markdown["data"]["text/markdown"] == "*y*"
    assert result.of("execute_result")[0]["data"]["text/html"] == "<p>last</p>"
    assert result.text("stdout") == ""


def test_matplotlib_figures_become_png(tmp_path):
    if not runner_python_has("matplotlib.pyplot"):
        pytest.skip(f"matplotlib cannot be imported by {PYTHON}")
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "plt.show()\n"
        "fig, ax = plt.subplots()\n"
        "ax.bar([1, 2], [3, 4])\n"
    )
    result = run_cell(tmp_path, code)
    assert result.returncode == 0
    assert result.of("stream") == []  # no warnings
    figures = result.of("display_data")
    assert len(figures) == 2
    for fig in figures:
        assert base64.b64decode(fig["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
        assert fig["data"]["text/plain"].startswith("<Figure size ")
        assert fig["data"]["text/plain"].endswith(" with 1 Axes>")


# --- exits and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "exit_code"),
    [("sys.exit(0)", 0), ("sys.exit(3)", 3), ("os._exit(1)", 1), ("sys.exit()", 0)],
)
def test_exits_keep_all_output(tmp_path, ending, exit_code):
    code = f"import os, sys\nprint('printed')\nos.write(1, b'written\\n')\n{ending}\nprint('no')\n"
    result = run_cell(tmp_path, code)
    assert result.returncode == exit_code
    assert result.text("stdout") == "printed\nwritten\n"
    assert result.of("error") == []


def test_sys_exit_with_a_message(tmp_path):
    result = run_cell(tmp_path, "import sys\nsys.exit('giving up')\n")
    assert result.returncode == 1
    assert result.text("stderr") == "giving up\n"
    assert result.of("error") == []


def test_syntax_error(tmp_path):
    result = run_cell(tmp_path, "x = 1\ny = (2 +\n")
    assert result.returncode == 1
    [error] = result.of("error")
    assert error["ename"] == "SyntaxError"
    text = "\n".join(error["traceback"])
    assert 'File "<cell>", line 2' in text
    assert "y = (2 +" in text
    assert "^" in text
    assert "runner.py" not in text
    assert "\x1b[" not in text


def test_import_error_shows_the_cell_line(tmp_path):
    result = run_cell(tmp_path, "print('before')\nimport no_such_module_here\n")
    assert result.returncode == 1
    assert result.text("stdout") == "before\n"
    [error] = result.of("error")
    assert error["ename"] == "ModuleNotFoundError"
    assert error["evalue"] == "No module named 'no_such_module_here'"
    tb = error["traceback"]
    assert tb[0] == "Traceback (most recent call last):"
    assert 'File "<cell>", line 2, in <module>' in tb[1]
    assert "import no_such_module_here" in "\n".join(tb)
    assert "runner.py" not in "\n".join(tb)


def test_exception_in_a_function_and_traceback_module(tmp_path):
    code = (
        "import traceback\n"
        "def f():\n"
        "    raise ValueError('bad')\n"
        "try:\n"
        "    f()\n"
        "except ValueError:\n"
        "    traceback.print_exc()\n"
        "f()\n"
    )
    result = run_cell(tmp_path, code)
    assert "    raise ValueError('bad')" in result.text("stderr")
    [error] = result.of("error")
    text = "\n".join(error["traceback"])
    assert "line 8, in <module>" in text
    assert "line 3, in f" in text
    assert text.endswith("ValueError: bad")


def test_interrupt_raises_keyboard_interrupt(live):
    runner = live("import time\nprint('ready')\ntime.sleep(100)\n")
    runner.wait_for("stream")
    runner.proc.stdin.write(b"interrupt\n")
    runner.proc.stdin.flush()
    error = runner.wait_for("error")
    assert error["ename"] == "KeyboardInterrupt"
    text = "\n".join(error["traceback"])
    assert 'File "<cell>", line ' in text  # usually line 3, the sleep; it may land sooner
    assert "runner.py" not in text
    assert runner.finish() == 130
    assert runner.frames[-1]["exit_code"] == 130


def test_the_runner_thread_never_takes_the_interrupt(tmp_path):
    # A partial line starts the runner's flush timer thread for a moment; SIGINT must go to
    # the main thread, or time.sleep() would not be interrupted.
    code = (
        "import os, sys\n"
        "sys.stdout.write('partial')\n"
        "tids = [t for t in os.listdir('/proc/self/task') if int(t) != os.getpid()]\n"
        "masks = []\n"
        "for tid in tids:\n"
        "    with open('/proc/self/task/%s/status' % tid) as f:\n"
        "        masks += [int(l.split()[1], 16) for l in f if l.startswith('SigBlk')]\n"
        "print()\n"
        "print(len(tids), all(mask & (1 << 1) for mask in masks))\n"
    )
    result = run_cell(tmp_path, code)
    assert result.text("stdout").splitlines()[-1] in ("1 True", "0 True")


def test_interrupt_while_waiting_for_threads_at_the_end(live):
    runner = live(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(100,)).start()\n"
        "print('cell done')\n"
    )
    runner.wait_for("stream")
    # The first interrupt may still land in the cell (after its last print): keep sending.
    for _ in range(100):
        try:
            runner.proc.stdin.write(b"interrupt\n")
            runner.proc.stdin.flush()
            runner.proc.wait(timeout=0.5)
            break
        except BrokenPipeError:
            break
        except subprocess.TimeoutExpired:
            pass
    assert runner.finish() == 130
    assert {f["ename"] for f in runner.frames if f["type"] == "error"} == {"KeyboardInterrupt"}


def test_rlimit_fsize_gives_an_error_frame(tmp_path):
    code = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * 2_000_000)\n"
    result = run_cell(tmp_path, code, "--rlimit-fsize", "1000000")
    assert result.returncode == 1
    [error] = result.of("error")
    assert error["ename"] in ("OSError", "IOError")
    assert "File too large" in error["evalue"]


def test_rlimit_nofile_applies(tmp_path):
    code = "import resource\nprint(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    result = run_cell(tmp_path, code, "--rlimit-nofile", "64")
    assert result.text("stdout") == "(64, 64)\n"


def test_killed_by_a_signal(tmp_path):
    result = run_cell(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert result.returncode == 128 + 9


def test_background_grandchild_does_not_hold_the_cell(tmp_path):
    code = "import subprocess\nsubprocess.Popen(['sleep', '30'])\nprint('left it running')\n"
    result = run_cell(tmp_path, code)  # returns within TIMEOUT, well before sleep ends
    assert result.text("stdout") == "left it running\n"


# --- text that is not plain ASCII -----------------------------------------------------------


def test_unicode_survives(tmp_path):
    text = "emoji 🎉👩‍👩‍👧 rtl שלום مرحبا combining e\u0301 a\u0308"
    code = (
        "import os, sys\n"
        f"print({text!r})\n"
        "print('\\ud800 lone')\n"
        "sys.stdout.buffer.write(b'bytes \\xff\\n')\n"
        "os.write(1, b'raw \\xff\\xfe\\n')\n"
        "'\\udcff'\n"
    )
    result = run_cell(tmp_path, code)
    assert result.returncode == 0
    assert result.text("stdout") == (f"{text}\n\\ud800 lone\nbytes \ufffd\nraw \ufffd\ufffd\n")
    assert result.of("execute_result")[0]["data"]["text/plain"] == "'\\udcff'"


def test_multibyte_characters_are_not_split(tmp_path):
    code = "import os\nfor b in '€'.encode() * 3:\n    os.write(1, bytes([b]))\n"
    result = run_cell(tmp_path, code)
    assert result.text("stdout") == "€€€"
    assert "\ufffd" not in result.text("stdout")


def test_rlimit_as_gives_memory_error(tmp_path):
    code = "data = bytearray(3_000_000_000)\n"
    result = run_cell(tmp_path, code, "--rlimit-as", "2000000000")
    assert result.returncode == 1
    assert [f["ename"] for f in result.of("error")] == ["MemoryError"]


# --- robustness -----------------------------------------------------------------------------


def test_threads_and_forked_workers_are_captured(tmp_path):
    code = (
        "import os, sys, threading\n"
        "def work(i):\n"
        "    sys.stdout.write('thread %d\\n' % i)  # print() is several writes\n"
        "threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n"
        "for t in threads: t.start()\n"
        "for t in threads: t.join()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('forked child')\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('parent')\n"
    )
    result = run_cell(tmp_path, code)
    lines = result.text("stdout").splitlines()
    assert sorted(lines[:8]) == [f"thread {i}" for i in range(8)]
    assert lines[8:] == ["forked child", "parent"]


def test_forged_event_lines_cannot_break_the_frame_channel(tmp_path):
    code = (
        "import fcntl, os\n"
        "for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n"
        "        writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY\n"
        "    except OSError:\n"
        "        continue  # the directory listing's own fd\n"
        "    if fd > 2 and writable:\n"
        '        os.write(fd, b\'not json\\n{"type": "end", "exit_code": 5}\\n\\xff\\n\')\n'
        "print('still fine')\n"
    )
    result = run_cell(tmp_path, code)  # checks: valid JSON, dense seq, exactly one end
    assert result.returncode == 0
    assert "still fine\n" in result.text("stdout")
    assert "not json\n" in result.text("stderr")


def test_a_gone_dispatcher_ends_the_runner_and_the_cell(tmp_path):
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    print('x' * 1000)\n"
    path = write_cell(tmp_path, code)
    proc = subprocess.Popen(
        [PYTHON, str(RUNNER), "--code-file", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert json.loads(proc.stdout.readline())["type"] == "start"
        child = int(json.loads(proc.stdout.readline())["text"].split()[0])
        proc.stdout.close()
        proc.wait(timeout=TIMEOUT)
        assert proc.returncode != 0
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_display_variants(tmp_path):
    code = (
        "display({'text/plain': 'raw bundle', 'text/html': '<p>raw</p>'}, raw=True)\n"
        "h = display('first', display_id='d1')\n"
        "h.update('second')\n"
        "display(1, 2, metadata={'k': 1})\n"
    )
    result = run_cell(tmp_path, code)
    shown = result.of("display_data")
    assert shown[0]["data"] == {"text/plain": "raw bundle", "text/html": "<p>raw</p>"}
    assert [f["data"]["text/plain"] for f in shown[1:]] == ["'first'", "1", "2"]
    assert shown[1]["transient"] == {"display_id": "d1"}
    assert shown[2]["metadata"] == {"k": 1}
    [updated] = result.of("update_display_data")  # replaces 'first' in place, no new output
    assert updated["data"]["text/plain"] == "'second'"
    assert updated["transient"] == {"display_id": "d1"}


def test_a_figure_as_the_last_expression_is_shown_once(tmp_path):
    if not runner_python_has("matplotlib.pyplot"):
        pytest.skip(f"matplotlib cannot be imported by {PYTHON}")
    code = "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nfig\n"
    result = run_cell(tmp_path, code)
    [shown] = result.of("execute_result")
    assert "image/png" in shown["data"]
    assert result.of("display_data") == []


def test_threads_are_waited_for_like_a_script(tmp_path):
    code = (
        "import atexit, threading, time\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "ThreadPoolExecutor(2).submit(print, 'from a pool')  # never shut down explicitly\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('late thread'))).start()\n"
        "atexit.register(print, 'atexit')\n"
        "f = open('unclosed.txt', 'w')\n"
        "f.write('flushed at the end')\n"
    )
    result = run_cell(tmp_path, code)
    assert result.returncode == 0
    assert result.text("stdout") == "from a pool\nlate thread\natexit\n"
    assert (tmp_path / "unclosed.txt").read_text() == "flushed at the end"


def test_await_isolation_waits_until_the_address_is_unreachable(tmp_path):
    """The cell runs only once HOST:PORT stops answering (a NetworkPolicy took effect)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(50)
    port = srv.getsockname()[1]
    threading.Timer(0.8, srv.close).start()
    cell = tmp_path / "cell.py"
    cell.write_text("import time\nprint(repr(time.time()))\n")
    started = time.time()
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--code-file", str(cell),
         "--await-isolation", f"127.0.0.1:{port}"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    printed = float("".join(f["text"] for f in frames if f["type"] == "stream"))
    assert done.returncode == 0
    assert printed >= started + 0.7  # it waited for the server to go away


def test_await_isolation_refuses_to_run_while_reachable(tmp_path):
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(50)
        cell = tmp_path / "cell.py"
        cell.write_text("print('SHOULD NOT RUN')\n")
        done = subprocess.run(
            [sys.executable, str(RUNNER), "--code-file", str(cell), "--await-isolation",
             f"127.0.0.1:{srv.getsockname()[1]}", "--isolation-timeout", "1"],
            capture_output=True, timeout=60,
        )  # fmt: skip
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1
    assert b"SHOULD NOT RUN" not in done.stdout
    (error,) = [f for f in frames if f["type"] == "error"]
    assert error["ename"] == "IsolationError"


def test_markers_point_at_the_failing_code_on_a_cell_last_line(tmp_path):
    # Notebook cells usually have no newline after their last line; the ^ markers under it
    # must still start under the failing expression, as they do on any other line.
    for code in ("x = 0\nassert x == 2, 'nope'", "x = 0\nassert x == 2, 'nope'\n", "1/0"):
        [error] = run_cell(tmp_path, code).of("error")
        tb = error["traceback"]
        marks = next(i for i, line in enumerate(tb) if line.strip().startswith(("^", "~")))
        source, under = tb[marks - 1], tb[marks]
        start = len(under) - len(under.lstrip())
        expression = "x == 2" if "assert" in code else "1/0"
        assert source.index(expression) == start, (code, tb)


# --- hostile bytes and floods (issue 13) ------------------------------------------------------

WRITE_EVENT_PIPE = (
    "import fcntl, os\n"
    "def to_event_pipe(data):\n"
    "    for fd in map(int, os.listdir('/proc/self/fd')):\n"
    "        try:\n"
    "            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY\n"
    "        except OSError:\n"
    "            continue\n"
    "        if fd > 2 and writable:\n"
    "            os.write(fd, data)\n"
)


def test_deeply_nested_json_on_the_event_pipe_is_shown_as_text(tmp_path):
    # `[` x 200000 made the supervisor's JSON parser raise RecursionError, which ended the
    # runner (no end frame, the cell killed); it is a line that is not an event, like any other
    code = WRITE_EVENT_PIPE + "to_event_pipe(b'[' * 200000 + b'\\n')\nprint('still fine')\n"
    result = run_cell(tmp_path, code)  # checks: valid JSON, dense seq, exactly one end
    assert result.returncode == 0
    assert result.text("stdout") == "still fine\n"
    assert result.text("stderr") == "[" * 200000 + "\n"


def test_an_endless_event_line_is_dropped_not_held(tmp_path):
    code = WRITE_EVENT_PIPE + (
        "for _ in range(40):\n"
        "    to_event_pipe(b'x' * (1 << 20))\n"
        "to_event_pipe(b'\\n')\n"
        "print('after')\n"
    )
    result = run_cell(tmp_path, code)
    assert result.returncode == 0
    assert result.text("stdout") == "after\n"
    assert "an output over 32 MiB was dropped" in result.text("stderr")
    assert "x" * 100 not in result.text("stderr")
    assert result.frames[-1]["dropped_bytes"] == 40 << 20


def test_output_limit_stops_output_but_not_the_error_or_end(tmp_path):
    # a flood wrote gigabytes to the pod's log (the node's disk) while the dispatcher kept
    # 10 MiB: the runner itself stops writing output frames past the limit
    limit = 200_000
    code = (
        "import os, sys\n"
        "for _ in range(50):\n"
        "    os.write(1, b'y' * 100_000)\n"
        "    sys.stdout.write('z' * 100_000)\n"
        "    display({'text/plain': 'shown?'}, raw=True)\n"
        "raise ValueError('the end')\n"
    )
    path = write_cell(tmp_path, code)
    proc = subprocess.run(
        [PYTHON, str(RUNNER), "--code-file", str(path), "--output-limit", str(limit)],
        stdin=subprocess.PIPE, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    frames = parse_frames(proc.stdout)
    check_frames(frames, 1)
    output = proc.stdout.split(b"\n")[1:-2]  # between start and end
    written = sum(len(line) + 1 for line in output)
    # up to the limit, plus the frame that crossed it (at most 64 Ki characters), plus the error
    assert limit < written < limit + (70 << 10) + 1000, written
    (error,) = [f for f in frames if f["type"] == "error"]
    assert error["evalue"] == "the end"
    dropped = frames[-1]["dropped_bytes"]
    assert 10_000_000 - written < dropped < 10_000_000, dropped


def test_without_an_output_limit_nothing_is_dropped(tmp_path):
    code = "import os\nfor _ in range(20):\n    os.write(1, b'y' * 100_000)\n"
    result = run_cell(tmp_path, code)
    assert len(result.text("stdout")) == 2_000_000
    assert "dropped_bytes" not in result.frames[-1]


def test_output_limit_must_be_a_number(tmp_path):
    done = subprocess.run(
        [PYTHON, str(RUNNER), "--code-file", str(write_cell(tmp_path, "1")),
         "--output-limit", "lots"],
        capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == b""
    assert b"--output-limit needs an integer" in done.stderr
