"""Run one notebook cell and stream its output as NDJSON frames.

This file is copied unchanged into sandboxes and pods: it uses only the standard library, runs
on any Python >= 3.8 and never imports crucible_jupyter::

    python3 runner.py --code-file PATH|- [--rlimit-fsize BYTES] [--rlimit-as BYTES]
                      [--rlimit-nofile N] [--max-frame-text CHARS] [--output-limit BYTES]

Channels:

* the runner's original fd 1 carries frames, one JSON object per line (see "The frame protocol"
  in ARCHITECTURE.md): ``start``, ``stream``, ``display_data``, ``update_display_data``,
  ``execute_result``, ``clear_output``, ``error`` and finally ``end`` with the exit code
  (and ``signal`` when a signal ended the cell);
* with ``--code-file -`` (a warm sandbox, started before there is a cell) the first line on
  stdin is the cell itself, as JSON (see ``_receive_cell``); with ``--ready-line TEXT`` the
  runner first writes TEXT as a line to fd 1 once it is ready for it (after the
  ``--await-isolation`` check, which a warm sandbox passes before it waits);
* stdin carries control lines: ``interrupt`` raises KeyboardInterrupt in the cell. EOF on stdin
  (or a closed stdin) only stops the reading of it;
* the runner's own stderr only reports crashes of the runner itself.

With ``--output-limit BYTES`` (the dispatcher's limit) the runner writes output frames until
their lines pass that many bytes (the frame that crosses it whole), then only ``error``
frames, up to ``_ERROR_ROOM`` more bytes, and ``end``, which reports the bytes it dropped
(``dropped_bytes``): a flood costs the pod's log (on the node's disk) no more than that.

How: this process (the supervisor) forks a child that runs the cell. The child's fd 1 and fd 2
are pipes the supervisor reads, so output of subprocesses, ``os.write`` and C extensions is
captured and labelled. ``sys.stdout``/``sys.stderr``, ``display()`` and results travel as JSON
lines over a separate event pipe; before sending an event the child waits (briefly) until the
supervisor has read everything from the fd-level pipes, so both kinds of output stay in order.
"""

from __future__ import annotations

import codecs
import io
import math
import os
import select
import sys
import time

try:  # the C module: `signal` itself imports enum, a large part of the start-up time
    import _signal as signal
except ImportError:  # pragma: no cover - not CPython
    import signal

PROTOCOL_VERSION = 1
CELL_FILENAME = "<cell>"
DEFAULT_MAX_FRAME_TEXT = 65536

_READ_SIZE = 65536
_FRAME_INTERVAL = 0.005  # output that keeps coming is sent at most this often, merged
_PIPE_BUF = getattr(select, "PIPE_BUF", 4096)
_DRAIN_IDLE_MS = 50  # after the cell ended: stop reading once this long without data...
_DRAIN_MAX = 2.0  # ...or after this many seconds in total (a background writer never stops)
_BARRIER_CAP = 0.05  # longest wait for the supervisor to catch up with fd-level output...
_BARRIER_STALL_CAP = 2.0  # ...that nothing else adds to (a busy machine descheduled it)
_BARRIER_SLEEP = 0.0002
_COALESCE_CHARS = 8192  # send buffered Python-level text once this much is pending
_PARTIAL_LINE_DELAY = 0.02  # ...or this many seconds after a write without a newline
_STREAM_PIECE = 2048  # characters per stream event (keeps one event within PIPE_BUF)
_CO_COROUTINE = 0x0080
_EXIT_USAGE = 2
#: Bytes of error frames written past --output-limit (the traceback that names the failure);
#: the dispatcher keeps 1 MiB of them, this leaves room for the frame that crossed the limit.
_ERROR_ROOM = 2 << 20
#: Longest line read from the event pipe; a longer one is dropped whole (counted), so a cell
#: writing without a newline cannot grow the supervisor's memory without end.
_MAX_EVENT_LINE = 32 << 20
_ERROR_MARK = b'"type":"error"'  # in every error event the child writes (compact JSON)
_EXIT_RUNNER_FAILURE = 1

_USAGE = (
    "usage: runner.py --code-file PATH|- [--rlimit-fsize BYTES] [--rlimit-as BYTES]"
    " [--rlimit-nofile N] [--max-frame-text CHARS] [--output-limit BYTES]"
    " [--await-isolation HOST:PORT"
    " [--isolation-timeout SECONDS]] [--ready-line TEXT]"
)
_OPTIONS = {
    "--code-file": "code_file",
    "--rlimit-fsize": "rlimit_fsize",
    "--rlimit-as": "rlimit_as",
    "--rlimit-nofile": "rlimit_nofile",
    "--max-frame-text": "max_frame_text",
    "--output-limit": "output_limit",
    "--await-isolation": "await_isolation",
    "--isolation-timeout": "isolation_timeout",
    "--ready-line": "ready_line",
}
_RLIMITS = (
    ("rlimit_fsize", "RLIMIT_FSIZE"),
    ("rlimit_as", "RLIMIT_AS"),
    ("rlimit_nofile", "RLIMIT_NOFILE"),
)
_ASYNC_SIGNALS = {
    getattr(signal, name)
    for name in (
        "SIGINT SIGTERM SIGHUP SIGQUIT SIGALRM SIGVTALRM SIGPROF SIGCHLD SIGUSR1 SIGUSR2 "
        "SIGWINCH SIGPIPE SIGXFSZ SIGXCPU SIGIO SIGURG"
    ).split()
    if hasattr(signal, name)
}


# --------------------------------------------------------------------------------------------
# JSON encoding shared by both processes


def _json_default(obj):
    if isinstance(obj, (bytes, bytearray, memoryview)):
        import binascii

        return binascii.b2a_base64(bytes(obj), newline=False).decode("ascii")
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _make_json():
    """Compact JSON ``(dumps, loads)`` built on the C accelerator ``_json``.

    Importing the ``json`` package pulls in ``re`` and ``enum``, which costs more than the
    rest of the runner's start-up; the accelerator alone does not. Falls back to ``json``
    on interpreters without it.
    """
    try:
        from _json import encode_basestring, make_encoder, make_scanner
    except ImportError:  # pragma: no cover - not CPython
        import json

        enc = json.JSONEncoder(
            ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_json_default
        )
        return enc.encode, json.loads

    encoder = make_encoder(
        None, _json_default, encode_basestring, None, ":", ",", False, False, False
    )

    def dumps(obj):
        if isinstance(obj, str):
            return encode_basestring(obj)
        return "".join(encoder(obj, 0))

    class _Context:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int

        @staticmethod
        def parse_constant(name):
            raise ValueError(f"{name} is not JSON")

    scan = make_scanner(_Context())

    def loads(text):
        start = len(text) - len(text.lstrip(" \t\r\n"))
        try:
            obj, end = scan(text, start)
        except StopIteration:
            raise ValueError("not JSON") from None
        if text[end:].strip(" \t\r\n"):
            raise ValueError("extra data after JSON")
        return obj

    return dumps, loads


_dumps, _loads = _make_json()


def _clean_text(text):
    """Return *text* with lone surrogates spelled out visibly (``\\ud800``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clean(obj, depth=0):
    """Return a copy of *obj* that json can always encode as valid UTF-8."""
    if isinstance(obj, str):
        return _clean_text(obj)
    if obj is None or isinstance(obj, (bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if obj - obj == 0 else repr(obj)  # nan and inf are not JSON
    if depth > 50:
        return "..."
    if isinstance(obj, dict):
        return {
            _clean(k if isinstance(k, str) else str(k)): _clean(v, depth + 1)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_clean(v, depth + 1) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _json_default(obj)
    try:
        text = str(obj)
    except Exception:  # noqa: BLE001 -- a cell's object's __str__ may raise anything
        text = f"<unprintable {type(obj).__name__} object>"
    return _clean_text(text)


def encode_json_line(obj) -> bytes:
    """Return *obj* as one line of compact UTF-8 JSON ending in a newline.

    Never fails on content: bytes become base64 text, lone surrogates are spelled out with a
    backslash, nan/inf and unknown objects become strings.
    """
    try:
        return (_dumps(obj) + "\n").encode("utf-8")
    except Exception:  # noqa: BLE001 -- a cell's object may fail to encode in any way; the cleaned copy encodes
        return (_dumps(_clean(obj)) + "\n").encode("utf-8")


def _now_ms():
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    """The command line is not valid."""


def parse_args(argv):
    """Parse the runner's command line into a dict; raise UsageError when it is invalid."""
    opts = {name: None for name in _OPTIONS.values()}
    opts["max_frame_text"] = DEFAULT_MAX_FRAME_TEXT
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise UsageError(_USAGE)
        name, sep, value = arg.partition("=")
        if name not in _OPTIONS:
            raise UsageError(f"unknown argument {arg!r}\n{_USAGE}")
        if not sep:
            i += 1
            if i >= len(argv):
                raise UsageError(f"{name} needs a value\n{_USAGE}")
            value = argv[i]
        key = _OPTIONS[name]
        if key in ("code_file", "await_isolation", "ready_line"):
            opts[key] = value
        else:
            try:
                number = int(value)
            except ValueError:
                raise UsageError(f"{name} needs an integer, got {value!r}") from None
            if number < (1 if key == "max_frame_text" else 0):
                raise UsageError(f"{name} is out of range: {number}")
            opts[key] = number
        i += 1
    if not opts["code_file"]:
        raise UsageError("--code-file is required\n" + _USAGE)
    return opts


# --------------------------------------------------------------------------------------------
# Supervisor


class _FrameChannelGone(Exception):
    pass


class FrameWriter:
    """Numbers frames densely from 0 and writes them, one JSON line each, to *fd*.

    Consecutive stream text of the same name is merged until ``flush()``; text frames never
    carry more than *max_text* characters. With *output_limit*, output frames stop once
    their lines passed that many bytes (see the module's docstring); ``dropped`` counts the
    bytes not written.
    """

    def __init__(self, fd, max_text=DEFAULT_MAX_FRAME_TEXT, output_limit=None):
        self._fd = fd
        self._max_text = max_text
        self._limit = output_limit
        self._written = 0  # bytes of output frame lines written (as the dispatcher counts)
        self.dropped = 0
        self._seq = 0
        self._lines = []
        self._stream_name = None
        self._stream_parts = []
        self._stream_t = 0

    def add(self, type_, fields):
        """Queue a frame of *type_* with *fields* (a dict without v/seq/t/type)."""
        self._close_stream()
        self._add(type_, fields, _now_ms())

    @property
    def cut(self):
        """Whether output passed the limit: from now on only errors (and end) are written."""
        return self._limit is not None and self._written > self._limit

    def drop(self, size):
        """Count *size* bytes of output that were not written (past the limit)."""
        self.dropped += size

    def add_stream(self, name, text):
        """Queue stream text for *name* ("stdout" or "stderr")."""
        if not text:
            return
        if self.cut:  # counted, not encoded: a flood past the limit costs little
            self._close_stream()
            self.dropped += len(text.encode("utf-8", "replace"))
            return
        if name != self._stream_name:
            self._close_stream()
            self._stream_name = name
            self._stream_t = _now_ms()
        self._stream_parts.append(text)

    @property
    def pending(self):
        """Whether frames or stream text wait for ``flush()``."""
        return bool(self._lines or self._stream_parts)

    def flush(self):
        """Write every queued frame; raise _FrameChannelGone when the channel is unusable."""
        self._close_stream()
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines = []
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise _FrameChannelGone(exc) from None

    def _add(self, type_, fields, t):
        frame = {"v": PROTOCOL_VERSION, "seq": self._seq, "t": t, "type": type_}
        frame.update(fields)
        line = encode_json_line(frame)
        if self._limit is not None and type_ not in ("start", "end"):
            room = self._limit + (_ERROR_ROOM if type_ == "error" else 0)
            if self._written > room or (self.cut and self._written + len(line) > room):
                self.dropped += len(line)  # (seq stays dense: only written frames count)
                return
            self._written += len(line)
        self._seq += 1
        self._lines.append(line)

    def _close_stream(self):
        name = self._stream_name
        if name is None:
            return
        text = "".join(self._stream_parts)
        self._stream_name = None
        self._stream_parts = []
        step = self._max_text
        for start in range(0, len(text), step):
            self._add("stream", {"name": name, "text": text[start : start + step]}, self._stream_t)


class _EventReader:
    """Turns the child's event lines into frames. The child is untrusted: any bytes may come
    (validated; a line that is not an event is shown as stderr text), and a line longer than
    ``_MAX_EVENT_LINE`` is dropped whole (counted) rather than held in memory."""

    def __init__(self, writer):
        self._writer = writer
        self._partial = bytearray()
        self._skipping = False  # inside a line that was too long: drop until its newline

    def feed(self, data):
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:])
                return
            self._keep(data[start:end])
            line = None if self._skipping else bytes(self._partial)
            self._partial = bytearray()
            self._skipping = False
            if line is not None:
                self._handle(line)
            start = end + 1

    def _keep(self, data):
        """Add *data* (no newline in it) to the line being read, within the bound."""
        if self._skipping:
            self._writer.drop(len(data))
        elif len(self._partial) + len(data) > _MAX_EVENT_LINE:
            self._writer.drop(len(self._partial) + len(data))
            self._partial = bytearray()
            self._skipping = True
            note = f"runner: an output over {_MAX_EVENT_LINE >> 20} MiB was dropped\n"
            self._writer.add_stream("stderr", note)
        else:
            self._partial += data

    def finish(self):
        if self._partial and not self._skipping:
            self._handle(bytes(self._partial))
        self._partial = bytearray()
        self._skipping = False

    def _handle(self, line):
        if not line.strip():
            return
        if self._writer.cut and _ERROR_MARK not in line:
            self._writer.drop(len(line))  # past the limit only errors are written: skip the rest
            return
        text = line.decode("utf-8", "replace")
        try:
            msg = _loads(text)
        except Exception:  # noqa: BLE001 -- not JSON, or nested too deep for the parser (RecursionError)
            msg = None
        fields = _validate_event(msg) if isinstance(msg, dict) else None
        if fields is None:  # not ours: show it rather than lose it
            self._writer.add_stream("stderr", text + "\n")
        elif fields[0] == "stream":
            self._writer.add_stream(fields[1]["name"], fields[1]["text"])
        else:
            self._writer.add(fields[0], fields[1])


def _validate_event(msg):
    type_ = msg.get("type")
    if type_ == "stream":
        name, text = msg.get("name"), msg.get("text")
        if name in ("stdout", "stderr") and isinstance(text, str):
            return type_, {"name": name, "text": text}
    elif type_ in ("display_data", "update_display_data", "execute_result"):
        data, metadata = msg.get("data"), msg.get("metadata") or {}
        if isinstance(data, dict) and isinstance(metadata, dict):
            fields = {"data": data, "metadata": metadata}
            if isinstance(msg.get("transient"), dict):
                fields["transient"] = msg["transient"]
            return type_, fields
    elif type_ == "clear_output":
        return type_, {"wait": bool(msg.get("wait"))}
    elif type_ == "error":
        tb = msg.get("traceback")
        if not isinstance(tb, list):
            tb = []
        return type_, {
            "ename": str(msg.get("ename", "")),
            "evalue": str(msg.get("evalue", "")),
            "traceback": [str(line) for line in tb],
        }
    return None


def _exit_code(status):
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return _EXIT_RUNNER_FAILURE


def _reap(pid, block=False):
    """Return the child's exit status, or None while it runs (only when not *block*)."""
    while True:
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return status
        if not block:
            return None


def _supervise(pid, out_r, err_r, ev_r, writer, control=b""):
    """Relay the child's output until it ended; return its exit code (128+N for signal N)
    and the signal that ended it (None when it exited).

    *control* holds stdin bytes already read (after a warm sandbox's cell line)."""
    POLLIN = select.POLLIN
    poller = select.poll()
    raw = {
        out_r: ("stdout", codecs.getincrementaldecoder("utf-8")("replace")),
        err_r: ("stderr", codecs.getincrementaldecoder("utf-8")("replace")),
    }
    for fd in (out_r, err_r, ev_r, 0):
        poller.register(fd, POLLIN)
    pending = bytearray()
    control_open = True
    events = _EventReader(writer)
    ev_open = True
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
            poller.register(pidfd, POLLIN)
        except OSError:
            pidfd = -1
    status = None
    exited_at = None
    backoff = 1
    flushed_at = 0.0

    def take_control(data):
        nonlocal pending
        pending += data
        *lines, rest = bytes(pending).split(b"\n")
        pending = bytearray(rest[-4096:])
        for line in lines:
            if line.strip() == b"interrupt" and status is None:
                _interrupt(pid)

    take_control(control)

    def read_raw(fd):
        name, decoder = raw[fd]
        try:
            data = os.read(fd, _READ_SIZE)
        except OSError:
            data = b""
        if data:
            writer.add_stream(name, decoder.decode(data))
        else:
            poller.unregister(fd)
            writer.add_stream(name, decoder.decode(b"", True))
            del raw[fd]

    while ev_open or status is None:
        if status is not None:
            timeout = _DRAIN_IDLE_MS  # the child ended but a descendant holds the event pipe
        elif pidfd >= 0:
            timeout = -1
        elif ev_open:
            timeout = 50
        else:  # the child is about to end: look often without a pidfd to tell us
            timeout = backoff
            backoff = min(backoff * 2, 50)
        if writer.pending:  # held back (see below): wake up when it is due
            due = max(1, math.ceil((flushed_at + _FRAME_INTERVAL - time.monotonic()) * 1000))
            timeout = due if timeout < 0 else min(timeout, due)
        ready = poller.poll(timeout)
        if not ready and status is not None:
            break
        got = {fd for fd, _ in ready}
        # Events first: the child's barrier guarantees that fd-level output written before an
        # event was read before the event was sent, so fd-level bytes that are waiting now
        # were written after the events that are waiting now.
        if ev_open and ev_r in got:
            try:
                data = os.read(ev_r, _READ_SIZE)
            except OSError:
                data = b""
            if data:
                events.feed(data)
            else:
                ev_open = False
                poller.unregister(ev_r)
                events.finish()
        for fd in (out_r, err_r):
            if fd in got and fd in raw:
                read_raw(fd)
        if control_open and 0 in got:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                control_open = False
                poller.unregister(0)
            else:
                take_control(data)
        if status is None and (pidfd < 0 or pidfd in got):
            status = _reap(pid)
            if status is not None:
                exited_at = time.monotonic()
                if pidfd >= 0:
                    poller.unregister(pidfd)
                    os.close(pidfd)
        # Output is sent at once, except in a flood: then at most every _FRAME_INTERVAL,
        # merged (ordering was settled when it was read; this only saves frames downstream)
        now = time.monotonic()
        if status is not None or now - flushed_at >= _FRAME_INTERVAL:
            writer.flush()
            flushed_at = now
        if exited_at is not None and time.monotonic() - exited_at > _DRAIN_MAX:
            break
    if status is None:
        status = _reap(pid, block=True)
    # The child is gone; a background grandchild may still hold the fd-level pipes open.
    if control_open:
        poller.unregister(0)
    if ev_open:
        poller.unregister(ev_r)
        events.finish()
    deadline = time.monotonic() + _DRAIN_MAX
    while raw and time.monotonic() < deadline:
        ready = poller.poll(_DRAIN_IDLE_MS)
        if not ready:
            break
        for fd, _ in sorted(ready):
            if fd in raw:
                read_raw(fd)
        writer.flush()
    for name, decoder in raw.values():
        writer.add_stream(name, decoder.decode(b"", True))
    return _exit_code(status), os.WTERMSIG(status) if os.WIFSIGNALED(status) else None


def _interrupt(pid):
    """Send SIGINT to the child's main thread (where Python raises KeyboardInterrupt).

    A process-wide kill() may be taken by any thread of the cell that does not block SIGINT,
    and then a main thread blocked in sleep() or join() would not wake up.
    """
    try:
        import ctypes

        if ctypes.CDLL(None).tgkill(pid, pid, signal.SIGINT) == 0:
            return
    except Exception:  # noqa: BLE001 -- no ctypes, no tgkill in this libc, a foreign libc: kill() below
        pass
    try:
        os.kill(pid, signal.SIGINT)
    except OSError:
        pass


def _set_dumpable(on):
    """prctl(PR_SET_DUMPABLE): when off, processes of the same user (the cell) can no longer
    read or write this one's memory, environment or file descriptors through /proc (which
    would let a cell rewrite its runner and forge frames). Inherited by fork()."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 1 if on else 0, 0, 0, 0)  # 4: PR_SET_DUMPABLE
    except Exception:  # noqa: BLE001 -- best effort: without ctypes or prctl the runner still runs
        pass


def _ensure_std_fds():
    """Make sure fds 0 and 2 are open (so pipes never land on them); return False without fd 1."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if fd == 1:
                return False
            spare = os.open(os.devnull, os.O_RDWR)
            if spare != fd:
                os.dup2(spare, fd)
                os.close(spare)
    return True


def main(argv=None):
    """Run one cell as the command line describes and exit with the cell's exit code.

    Writes ``start``, the cell's output frames and ``end`` to fd 1. Exit codes: 0 success,
    1 exception, 130 KeyboardInterrupt, the SystemExit code, 128+N when the cell died of
    signal N, 2 for a bad command line (nothing written to fd 1 then).
    """
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        source = None
        if opts["code_file"] != "-":
            with open(opts["code_file"], "rb") as f:
                source = f.read()
    except (UsageError, OSError) as exc:
        sys.stderr.write(f"runner: {exc}\n")
        sys.stderr.flush()
        os._exit(_EXIT_USAGE)
    if not _ensure_std_fds():
        os._exit(_EXIT_USAGE)
    _drop_cluster_env()  # (re-executes the runner when the kubelet added its variables)
    _set_dumpable(False)  # the cell runs as the same user: keep it out of this process
    if "MPLBACKEND" not in os.environ:
        os.environ["MPLBACKEND"] = "Agg"
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in (0, 1):  # a non-blocking pipe from the dispatcher would make writes fail
        try:
            os.set_blocking(fd, True)
        except OSError:
            pass
    control = b""
    target, isolated = opts["await_isolation"], None
    if source is None:  # a warm sandbox: everything is loaded, now wait for the cell
        if target:  # ...once isolated: a warm pod must not be handed a cell before
            isolated = _await_isolation(target, opts["isolation_timeout"] or 30)
        if not target or isolated is True:  # (a local sandbox has nothing to wait for)
            if opts["ready_line"]:  # tell whoever waits for this sandbox that it is ready
                os.write(1, opts["ready_line"].encode("utf-8") + b"\n")
            source, control = _receive_cell(opts)
    writer = FrameWriter(1, opts["max_frame_text"], opts["output_limit"])
    supervisor_pid = os.getpid()
    writer.add("start", {"python": ".".join(map(str, sys.version_info[:3])), "pid": supervisor_pid})
    try:
        writer.flush()
    except _FrameChannelGone:
        os._exit(_EXIT_RUNNER_FAILURE)
    if isolated is None and target:
        isolated = _await_isolation(target, opts["isolation_timeout"] or 30)
    if isolated is not None and isolated is not True:
        message = f"network isolation is not in place: {isolated} is reachable"
        hint = "the cell was not run (is a NetworkPolicy enforcer running?)"
        writer.add("error", {
            "ename": "IsolationError",
            "evalue": message,
            "traceback": [f"IsolationError: {message}; {hint}"],
        })  # fmt: skip
        writer.add("end", {"exit_code": _EXIT_RUNNER_FAILURE})
        writer.flush()
        os._exit(_EXIT_RUNNER_FAILURE)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ev_r, ev_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _child_main(opts, source, supervisor_pid, out_r, out_w, err_r, err_w, ev_r, ev_w)
        except BaseException:  # noqa: BLE001 -- a bug of the runner: say so on the cell's stderr
            import traceback

            os.write(2, _clean_text("runner: " + traceback.format_exc()).encode("utf-8"))
        os._exit(_EXIT_RUNNER_FAILURE)
    for fd in (out_w, err_w, ev_w):
        os.close(fd)
    # SIGTERM (a pod being deleted: cancel) interrupts the cell, so its output still ends cleanly
    signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt(pid))
    try:
        code, killed_by = _supervise(pid, out_r, err_r, ev_r, writer, control)
        end = {"exit_code": code}
        if killed_by:  # what the exit code alone cannot say: a cell can exit with 137 too
            end["signal"] = killed_by
        if writer.dropped:
            end["dropped_bytes"] = writer.dropped
        writer.add("end", end)
        writer.flush()
    except _FrameChannelGone:
        code = _EXIT_RUNNER_FAILURE
        _kill(pid)
    except BaseException:  # noqa: BLE001 -- a bug of the runner: kill the cell, show the trace, exit as failed
        _kill(pid)
        import traceback

        traceback.print_exc()
        code = _EXIT_RUNNER_FAILURE
    os._exit(code)


def _receive_cell(opts):
    """Read the cell of a warm sandbox (``--code-file -``) from stdin: one JSON line
    ``{"code": str, "env": {str: str}, "rlimit_as": int|null}``. Applies ``env`` and
    ``rlimit_as``; returns the source and any control bytes that followed the line. Exits 0
    without a word when stdin closes first (the sandbox was not needed after all)."""
    buf = b""
    while b"\n" not in buf:
        try:
            data = os.read(0, _READ_SIZE)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            os._exit(0)
        buf += data
    line, _, rest = buf.partition(b"\n")
    try:
        cell = _loads(line.decode("utf-8"))
        code, env = cell["code"], cell.get("env") or {}
        ok = isinstance(code, str) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        )
    except Exception:  # noqa: BLE001 -- whatever malformed input raises, it is refused the same way
        ok = False
    if not ok:
        sys.stderr.write("runner: the cell sent on stdin is not valid\n")
        sys.stderr.flush()
        os._exit(_EXIT_USAGE)
    os.environ.update(env)
    if cell.get("rlimit_as"):
        opts["rlimit_as"] = int(cell["rlimit_as"])
    return code.encode("utf-8"), rest


#: Variables the kubelet puts into every container, even with enableServiceLinks: false
#: (they name the API server's address); the runner removes them before a cell runs.
_CLUSTER_ENV = ("KUBERNETES_SERVICE_", "KUBERNETES_PORT")


def _drop_cluster_env():
    """Re-execute the runner without the kubelet's ``KUBERNETES_SERVICE_*``/``KUBERNETES_PORT*``
    variables, if it has any: deleting them from ``os.environ`` alone would leave them in the
    process's initial environment, which the cell can read in ``/proc/self/environ``."""
    names = [k for k in os.environ if k.startswith(_CLUSTER_ENV)]
    if not names:
        return
    env = {k: v for k, v in os.environ.items() if k not in names}
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot re-execute: at least the cell's os.environ lacks them
        for k in names:
            os.environ.pop(k, None)


def _await_isolation(spec, limit=30.0):
    """Wait until nothing ``spec`` names can be reached: True then, else (after ``limit`` s)
    the address that still can.

    ``spec``: ``HOST:PORT`` targets, comma-separated (IPv6 in brackets, ``[fd00::1]:6443``),
    addresses where something listens (the API server's). The node, as this pod sees it, is
    probed too on the targets' ports: its IPv4 default gateway and, when the pod has IPv6 on
    that interface, its IPv6 default routers and the link-local address formed (EUI-64) from
    the gateway's MAC address — the policy must hold for every address family. Reached means
    a TCP connection was accepted; a refusal (a reset, or the policy enforcer's reject) or no
    answer within a quarter of a second counts as not reached.

    Network policies are enforced asynchronously to a pod's start: for a moment a new pod
    may still reach the network. The cell must not run in that moment.
    """
    try:
        targets = _parse_targets(spec)
    except ValueError:
        return f"{spec!r} (not HOST:PORT[,HOST:PORT...], so nothing was checked)"
    ports = sorted({port for _, port in targets})
    deadline = time.monotonic() + limit
    while True:
        probed = targets + _node_targets(ports)
        reached = _reachable(probed)
        if reached is None:
            if probed == targets + _node_targets(ports):
                return True
            continue  # the probe taught the pod the gateway's MAC: probe its IPv6 address too
        if time.monotonic() > deadline:
            return reached
        time.sleep(0.05)


def _parse_targets(spec):
    """``"h:p,[v6]:p"`` as ``[(host, port)]``; ValueError when malformed."""
    targets = []
    for item in spec.split(","):
        host, _, port = item.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not 0 < int(port) < 65536:
            raise ValueError(item)
        targets.append((host, int(port)))
    return targets


def _reachable(targets, timeout=0.25):
    """The first of ``targets`` (``[(host, port)]``) that accepts a TCP connection within
    ``timeout`` seconds (all are tried at once), as ``host:port``; None if none does."""
    import errno
    import socket

    pending, reached = {}, None
    for host, port in targets:
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_NUMERICHOST)  # fmt: skip
            except socket.gaierror:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue  # a name that does not resolve (no DNS in an isolated pod)
        for family, type_, proto, _, address in infos:
            try:
                sock = socket.socket(family, type_, proto)
            except OSError:
                continue  # e.g. no IPv6 at all
            sock.setblocking(False)
            err = sock.connect_ex(address)
            if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                pending[sock] = label
                continue
            sock.close()
            if err == 0:
                reached = reached or label
    end = time.monotonic() + timeout
    while pending and reached is None and time.monotonic() < end:
        _, ready, _ = select.select([], list(pending), [], max(0.0, end - time.monotonic()))
        for sock in ready:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                reached = reached or pending[sock]
            sock.close()
            del pending[sock]
    for sock in pending:
        sock.close()
    return reached


def _node_targets(ports):
    """The node as this pod sees it, on ``ports``: the IPv4 default gateway; if the pod's
    interface (of the default route, else of its first route) has IPv6, the IPv6 default
    routers and the EUI-64 link-local addresses of the MACs its ARP table learnt there (the
    gateway's, the node's), scoped to that interface. Best effort: a bridge keeps the
    link-local address of the MAC it had when it came up, which ARP no longer shows."""
    import socket

    def rows(path):
        try:
            with open(path) as f:
                return [line.split() for line in f.read().splitlines()[1:]]
        except OSError:
            return []

    routes = [r for r in rows("/proc/net/route") if len(r) > 2 and r[0] != "lo"]
    default = [r for r in routes if r[1] == "00000000" and r[2] != "00000000"]
    if not routes:
        return []
    iface = (default or routes)[0][0]
    found = []
    if default:
        gateway = socket.inet_ntoa(bytes.fromhex(default[0][2])[::-1])
        found = [(gateway, p) for p in ports]
    try:
        with open("/proc/net/if_inet6") as f:  # (no header line)
            with_v6 = [line for line in f.read().splitlines() if line.split()[-1:] == [iface]]
    except OSError:
        with_v6 = []
    if not with_v6:
        return found
    nodes = set()
    for row in rows("/proc/net/arp"):
        if len(row) > 5 and row[2] == "0x2" and row[5] == iface:
            mac = bytearray.fromhex(row[3].replace(":", ""))
            mac[0] ^= 2
            eui64 = b"\xfe\x80" + bytes(6) + mac[:3] + b"\xff\xfe" + mac[3:]
            nodes.add(socket.inet_ntop(socket.AF_INET6, eui64))
    try:
        with open("/proc/net/ipv6_route") as f:
            for row in (line.split() for line in f):
                if len(row) > 9 and row[0] == "0" * 32 and row[4] != "0" * 32 and row[9] == iface:
                    nodes.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(row[4])))
    except OSError:
        pass
    return found + [(f"{a}%{iface}", p) for a in sorted(nodes) for p in ports]


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Child: capture


class _EventChannel:
    """The child's end of the event pipe: coalesced stream text and rich messages, in order."""

    def __init__(self, fd, raw_fds):
        import _thread

        self._fd = fd
        self._raw_fds = list(raw_fds)
        self._thread = _thread
        self._lock = _thread.RLock()
        self._pending = []
        self._pending_size = 0
        self._timer_running = False
        self._barrier_cap = _BARRIER_CAP
        self.broken = False
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=self._lock.acquire,
                after_in_parent=self._lock.release,
                after_in_child=self._after_fork,
            )

    def write_text(self, name, text):
        """Queue Python-level *text* for stream *name*; send it at a newline or when large."""
        with self._lock:
            self._pending.append((name, text))
            self._pending_size += len(text)
            if "\n" in text or self._pending_size >= _COALESCE_CHARS:
                self._flush_locked()
            elif not self._timer_running:
                self._timer_running = True
                try:
                    self._start_timer()
                except Exception:  # noqa: BLE001 -- no timer thread (RuntimeError, MemoryError...): flush now instead
                    self._timer_running = False
                    self._flush_locked()

    def flush(self):
        """Send every pending piece of stream text now."""
        with self._lock:
            self._flush_locked()

    def send(self, msg):
        """Send a rich message (a dict with "type") after any pending stream text."""
        line = encode_json_line(msg)
        with self._lock:
            self._flush_locked()
            if not self.broken:
                self._barrier()
                self._write(line)

    def _after_fork(self):
        self._lock = self._thread.RLock()
        self._timer_running = False

    def _start_timer(self):
        # The timer thread must never receive a signal meant for the cell: an interrupt taken
        # by it would not wake the main thread from time.sleep().
        if not hasattr(signal, "pthread_sigmask"):
            self._thread.start_new_thread(self._timer, ())
            return
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            self._thread.start_new_thread(self._timer, ())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _timer(self):
        try:
            time.sleep(_PARTIAL_LINE_DELAY)
            with self._lock:
                self._timer_running = False
                self._flush_locked()
        except BaseException:  # noqa: BLE001 -- the timer thread ends quietly, even at interpreter shutdown
            pass

    def _flush_locked(self):
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_size = 0
        merged = []
        for name, text in pending:
            if merged and merged[-1][0] == name:
                merged[-1][1].append(text)
            else:
                merged.append((name, [text]))
        if not self.broken:
            lines = []
            for name, texts in merged:
                _stream_event_lines(name, "".join(texts), lines)
            self._barrier()
            batch = b""
            for line in lines:
                if batch and len(batch) + len(line) > _PIPE_BUF:
                    self._write(batch)
                    batch = b""
                batch += line
            if batch:
                self._write(batch)
            if not self.broken:
                return
        for name, texts in merged:  # no event pipe any more: fall back to the raw fds
            try:
                os.write(1 if name == "stdout" else 2, _clean_text("".join(texts)).encode("utf-8"))
            except OSError:
                pass

    def _write(self, data):
        if self.broken:
            return
        view = memoryview(data)
        mask = len(view) > _PIPE_BUF and hasattr(signal, "pthread_sigmask")
        if mask:  # a torn message would garble the event stream: delay SIGINT until it is out
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            self.broken = True
        finally:
            if mask:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _barrier(self):
        """Wait until the supervisor has read all fd-level output written so far."""
        import fcntl
        import termios

        deadline = stall_deadline = last = None
        writing = False  # the backlog grew while we waited: something else keeps writing
        while True:
            pending = 0
            for fd in self._raw_fds:
                try:
                    pending += int.from_bytes(
                        fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder
                    )
                except OSError:
                    self._raw_fds.remove(fd)
                    return
            if not pending:
                self._barrier_cap = _BARRIER_CAP
                return
            writing = writing or (last is not None and pending > last)
            last = pending
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._barrier_cap
                stall_deadline = now + _BARRIER_STALL_CAP
            elif writing and now >= deadline:
                # Something keeps writing: do not stall every print by the full cap.
                self._barrier_cap = max(self._barrier_cap / 4, 0.001)
                return
            elif now >= stall_deadline:
                return  # the supervisor is not reading (stopped?): do not wait forever
            time.sleep(_BARRIER_SLEEP)


def _stream_event_lines(name, text, out):
    """Append stream events for *text* to *out*, each (when possible) within PIPE_BUF bytes."""
    prefix = '{"type":"stream","name":"' + name + '","text":'
    for start in range(0, len(text), _STREAM_PIECE):
        _stream_piece(prefix, text[start : start + _STREAM_PIECE], out)


def _stream_piece(prefix, piece, out):
    try:
        line = (prefix + _dumps(piece) + "}\n").encode("utf-8")
    except UnicodeEncodeError:
        piece = _clean_text(piece)
        line = (prefix + _dumps(piece) + "}\n").encode("utf-8")
    if len(line) > _PIPE_BUF and len(piece) > 1:
        half = len(piece) // 2
        _stream_piece(prefix, piece[:half], out)
        _stream_piece(prefix, piece[half:], out)
    else:
        out.append(line)


class _WriteOnlyStream:
    """What the cell's text and binary streams share: write-only, never a terminal, and
    ``close()`` only flushes (the cell must not lose its output)."""

    def close(self):
        self.flush()

    def isatty(self):
        return False

    def writable(self):
        return True

    def readable(self):
        return False

    def seekable(self):
        return False


class CellStream(_WriteOnlyStream, io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a cell: a text file whose writes become stream frames.

    Text is sent at each newline, when 8 KiB are pending, on ``flush()``, or at most 20 ms
    after a partial line. ``fileno()`` is the captured fd, ``.buffer`` accepts bytes.
    """

    def __init__(self, name, fd, channel):
        super().__init__()
        self._stream_name = name
        self._fd = fd
        self._channel = channel
        self.buffer = CellBinaryStream(self)

    @property
    def name(self):
        return f"<{self._stream_name}>"

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "backslashreplace"

    @property
    def line_buffering(self):
        return True

    @property
    def mode(self):
        return "w"

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            self._channel.write_text(self._stream_name, s)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self._channel.flush()

    def fileno(self):
        return self._fd

    def reconfigure(self, **kwargs):
        """Accepted and ignored: output is always UTF-8."""


class CellBinaryStream(_WriteOnlyStream, io.BufferedIOBase):
    """``sys.stdout.buffer`` of a cell: bytes are decoded as UTF-8 (invalid bytes replaced)."""

    def __init__(self, text_stream):
        super().__init__()
        self._text = text_stream
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, b):
        if isinstance(b, str):
            raise TypeError("a bytes-like object is required, not 'str'")
        data = bytes(b)
        text = self._decoder.decode(data)
        if text:
            self._text.write(text)
        return len(data)

    def flush(self):
        self._text.flush()

    def fileno(self):
        return self._text.fileno()


# --------------------------------------------------------------------------------------------
# Child: rich output

_channel = None  # the child's _EventChannel
_source_lines = []  # the cell's lines, for linecache
_shown_figures = set()  # ids of figures already shown during this cell
_ipython_formatter = []  # [DisplayFormatter or None] once looked up
_PLAIN_TYPES = (int, float, complex, bool, str, bytes, type(None))
_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
    ("_repr_javascript_", "application/javascript"),
    ("_repr_pdf_", "application/pdf"),
)


def _send(msg):
    if _channel is not None:
        _channel.send(msg)
    elif msg.get("type") in ("display_data", "update_display_data", "execute_result"):
        print(msg["data"].get("text/plain", ""))


def format_display_data(obj, include=None, exclude=None):
    """Return ``(data, metadata)``: the MIME bundle for *obj*, always with text/plain.

    Uses IPython's DisplayFormatter when IPython is importable (imported on first need), else
    the object's ``_repr_*_`` methods. matplotlib figures become image/png.
    """
    if type(obj) in _PLAIN_TYPES:
        return {"text/plain": repr(obj)}, {}
    mpl_figure = sys.modules.get("matplotlib.figure")
    if mpl_figure is not None and isinstance(obj, mpl_figure.Figure):
        _shown_figures.add(id(obj))
        return _figure_bundle(obj), {}
    formatter = _get_ipython_formatter()
    if formatter is not None:
        data, metadata = formatter.format(obj, include=include, exclude=exclude)
        return data, metadata or {}
    return _fallback_bundle(obj, include, exclude)


def _get_ipython_formatter():
    if not _ipython_formatter:
        formatter = None
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from IPython.core.formatters import DisplayFormatter

                formatter = DisplayFormatter()
        except Exception:  # noqa: BLE001 -- IPython missing or broken in the image: plain repr instead
            pass
        _ipython_formatter.append(formatter)
    return _ipython_formatter[0]


def _repr_method(obj, name):
    if isinstance(obj, type):
        return None
    try:
        method = getattr(obj, name, None)
    except Exception:  # noqa: BLE001 -- a cell's object's __getattr__ may raise anything
        return None
    return method if callable(method) else None


def _fallback_bundle(obj, include=None, exclude=None):
    data, metadata = {}, {}
    method = _repr_method(obj, "_repr_mimebundle_")
    if method is not None:
        try:
            bundle = method(include=include, exclude=exclude)
        except Exception:  # noqa: BLE001 -- a cell's _repr_mimebundle_ may raise anything
            bundle = None
        if isinstance(bundle, tuple) and len(bundle) == 2:
            bundle, md = bundle
            if isinstance(md, dict):
                metadata.update(md)
        if isinstance(bundle, dict):
            data.update(bundle)
    for name, mime in _REPR_METHODS:
        method = None if mime in data else _repr_method(obj, name)
        if method is None:
            continue
        try:
            value = method()
        except Exception:  # noqa: BLE001 -- a cell's _repr_*_ method may raise anything
            continue
        if isinstance(value, tuple) and len(value) == 2:
            value, md = value
            if md:
                metadata[mime] = md
        if value is None:
            continue
        data[mime] = _json_default(value) if isinstance(value, (bytes, bytearray)) else value
    if "text/plain" not in data:
        data["text/plain"] = repr(obj)
    if include:
        data = {k: v for k, v in data.items() if k in include}
    if exclude:
        data = {k: v for k, v in data.items() if k not in exclude}
    return data, metadata


class DisplayHandle:
    """What ``display(..., display_id=...)`` returns; ``update()`` shows the new object."""

    def __init__(self, display_id):
        self.display_id = display_id

    def display(self, obj, **kwargs):
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj, **kwargs):
        display(obj, display_id=self.display_id, update=True, **kwargs)


def display(
    *objs,
    include=None,
    exclude=None,
    metadata=None,
    transient=None,
    display_id=None,
    raw=False,
    clear=False,
    update=False,
    **kwargs,
):
    """Show each object as a ``display_data`` frame; IPython's ``display()`` signature.

    With ``raw=True`` the objects are MIME bundles already. Returns a DisplayHandle when
    *display_id* is given (``True`` makes a new id). With ``update=True`` and a display id,
    an ``update_display_data`` frame replaces what that id shows instead of adding an output.
    """
    if clear:
        clear_output(wait=True)
    if display_id is True:
        display_id = os.urandom(16).hex()
    for obj in objs:
        if raw:
            data, md = obj, {}
        else:
            data, md = format_display_data(obj, include, exclude)
            if not data:  # _ipython_display_ showed it itself
                continue
        if metadata:
            md = dict(md)
            md.update(metadata)
        kind = "update_display_data" if update and display_id else "display_data"
        msg = {"type": kind, "data": data, "metadata": md}
        if transient or display_id:
            msg["transient"] = dict(transient or {})
            if display_id:
                msg["transient"]["display_id"] = display_id
        _send(msg)
    if display_id:
        return DisplayHandle(display_id)
    return None


def update_display(obj, *, display_id, **kwargs):
    """Replace what *display_id* shows with *obj* (an ``update_display_data`` frame)."""
    display(obj, display_id=display_id, update=True, **kwargs)


def clear_output(wait=False):
    """Clear the cell's output (with *wait*, once new output arrives): a ``clear_output`` frame."""
    _send({"type": "clear_output", "wait": bool(wait)})


def publish_display_data(
    data, metadata=None, source=None, *, transient=None, update=False, **kwargs
):
    """Send a ready MIME bundle as a ``display_data`` frame (IPython's signature; with
    ``update=True`` and a display id in *transient*, an ``update_display_data`` frame)."""
    kind = "display_data"
    if update and isinstance(transient, dict) and transient.get("display_id"):
        kind = "update_display_data"
    msg = {"type": kind, "data": data, "metadata": metadata or {}}
    if transient:
        msg["transient"] = transient
    _send(msg)


def _figure_bundle(fig):
    data = {"text/plain": repr(fig)}
    if fig.axes or getattr(fig, "lines", None):
        buf = io.BytesIO()
        fig.canvas.print_figure(
            buf,
            format="png",
            facecolor=fig.get_facecolor(),
            edgecolor=fig.get_edgecolor(),
            dpi=fig.dpi,
            bbox_inches="tight",
        )
        data["image/png"] = _json_default(buf.getvalue())
    return data


def show_open_figures(skip_shown=False):
    """Display every open pyplot figure as image/png and close them (what inline does)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if pyplot is None or helpers is None:
        return
    try:
        for manager in helpers.Gcf.get_all_fig_managers():
            fig = manager.canvas.figure
            if not (skip_shown and id(fig) in _shown_figures) and fig.axes:
                display(fig)
    finally:
        pyplot.close("all")
        _shown_figures.clear()


def _patch_pyplot(module):
    def show(*args, **kwargs):
        show_open_figures()

    show.__doc__ = getattr(module.show, "__doc__", None)
    module.show = show


def _patch_ipython_display(module):
    for name, func in (
        ("display", display),
        ("clear_output", clear_output),
        ("publish_display_data", publish_display_data),
        ("update_display", update_display),
    ):
        if hasattr(module, name):
            setattr(module, name, func)


def _patch_linecache(module):
    module.cache[CELL_FILENAME] = (
        sum(len(line) for line in _source_lines),
        None,
        _source_lines,
        CELL_FILENAME,
    )


_POST_IMPORT_PATCHES = {
    "matplotlib.pyplot": _patch_pyplot,
    "IPython.core.display_functions": _patch_ipython_display,
    "IPython.core.display": _patch_ipython_display,
    "IPython.display": _patch_ipython_display,
    "linecache": _patch_linecache,
}


class _PatchingLoader:
    """Wraps a module's loader: runs it, then patches the fresh module."""

    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._patch(module)
        except Exception:  # noqa: BLE001 -- a patch that fails leaves the module as it was imported
            pass

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportHook:
    """A ``sys.meta_path`` finder that patches selected modules right after they execute."""

    def __init__(self, patches):
        self._patches = patches

    def find_spec(self, fullname, path=None, target=None):
        patch = self._patches.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec

    def invalidate_caches(self):
        pass


# --------------------------------------------------------------------------------------------
# Child: execution


def _child_main(opts, source, supervisor_pid, out_r, out_w, err_r, err_w, ev_r, ev_w):
    """Set up the child's fds, streams and hooks, run the cell and exit with its exit code."""
    global _channel
    _set_dumpable(True)  # the cell's processes may inspect each other, as usual
    os.close(ev_r)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    _close_fds(keep=(0, 1, 2, ev_w, out_r, err_r))
    if os.getppid() != supervisor_pid:
        os._exit(_EXIT_RUNNER_FAILURE)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceeding --rlimit-fsize raises OSError

    _channel = _EventChannel(ev_w, (out_r, err_r))
    sys.stdout = CellStream("stdout", 1, _channel)
    sys.stderr = CellStream("stderr", 2, _channel)

    text = source.decode("utf-8-sig", "replace")
    _source_lines[:] = _cell_lines(text)
    if "linecache" in sys.modules:
        _patch_linecache(sys.modules["linecache"])
    sys.meta_path.insert(0, _PostImportHook(_POST_IMPORT_PATCHES))
    for name, patch in _POST_IMPORT_PATCHES.items():
        if name in sys.modules and name != "linecache":
            patch(sys.modules[name])

    import builtins

    builtins.display = display
    builtins.clear_output = clear_output
    builtins.input = _no_input
    main_module = type(sys)("__main__")
    main_module.__builtins__ = builtins
    sys.modules["__main__"] = main_module
    sys.argv = [CELL_FILENAME]
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = ""

    try:
        _apply_rlimits(opts)
    except Exception as exc:  # noqa: BLE001 -- any failure is reported to the cell as the runner's
        _send_error(exc, "runner: cannot apply resource limits")
        _exit_child(_EXIT_RUNNER_FAILURE, {})
    code = execute_cell(text, main_module.__dict__)
    _exit_child(code, main_module.__dict__)


def _cell_lines(text):
    """The cell's lines as linecache holds a file's: each ends with a newline, the last too
    (the traceback module places its ``^`` markers one column right on a line without one)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").splitlines(True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def _no_input(prompt=""):
    """``input()`` in a cell: there is no one to type (stdin is empty), so say so at once."""
    if prompt:
        sys.stdout.write(str(prompt))
        sys.stdout.flush()
    raise EOFError(
        "input() is not available: a crucible cell runs on its own, without stdin, so nothing"
        " can be typed into it; put the value in the cell instead"
    )


def _exit_child(code, namespace):
    """End the child like the end of a script, minus the slow teardown of every module.

    Non-daemon threads are waited for, atexit handlers run, the cell's variables are released
    (so unclosed files get flushed), Python and C stdio buffers are flushed.
    """
    steps = (
        _wait_for_threads,
        getattr(sys.modules.get("atexit"), "_run_exitfuncs", None),
        namespace.clear,
    )
    for step in steps:  # still interruptible: a thread that never ends must not hang us
        if step is not None:
            try:
                step()
            except KeyboardInterrupt as exc:
                _send_error(exc)
                code = 130
            except BaseException:  # noqa: BLE001 -- teardown goes on whatever the cell's atexit hooks or threads raise
                pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 -- the cell may have replaced the streams with anything
            pass
    if _channel is not None:
        _channel.flush()
    ctypes = sys.modules.get("ctypes")
    if ctypes is not None:
        try:
            ctypes.CDLL(None).fflush(None)
        except Exception:  # noqa: BLE001 -- sys.modules['ctypes'] may be the cell's own object
            pass
    os._exit(code & 0xFF)


def _wait_for_threads():
    """Wait for non-daemon threads as the interpreter's shutdown does (interruptibly)."""
    threading = sys.modules.get("threading")
    if threading is None or not hasattr(threading, "_shutdown"):
        return
    threading._shutdown()  # also runs threading's own atexit hooks (concurrent.futures)
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        raise KeyboardInterrupt  # the wait was interrupted (Python >= 3.13 swallows that)


def _close_fds(keep):
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        try:
            fds = range(3, min(os.sysconf("SC_OPEN_MAX"), 65536))
        except (OSError, ValueError):
            fds = range(3, 1024)
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _apply_rlimits(opts):
    wanted = [(limit, opts[key]) for key, limit in _RLIMITS if opts.get(key) is not None]
    if not wanted:
        return
    import resource

    for limit, value in wanted:
        resource.setrlimit(getattr(resource, limit), (value, value))


def execute_cell(source, namespace):
    """Run *source* in *namespace* like a notebook cell and return the exit code.

    The value of a final expression becomes an ``execute_result`` (unless the cell ends with a
    semicolon); exceptions become an ``error`` frame (exit 1, 130 for KeyboardInterrupt);
    SystemExit gives its code without an error frame; top-level ``await`` works. Open pyplot
    figures are shown at the end.
    """
    import builtins

    loop = []
    try:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            body, last = _compile_cell(source)
            _run_code(body, namespace, loop)
            if last is not None:
                value = _run_code(last, namespace, loop)
                if value is not None:
                    builtins._ = value
                    data, metadata = format_display_data(value)
                    _send({"type": "execute_result", "data": data, "metadata": metadata})
        finally:
            if loop:
                _close_loop(loop[0])
        code = 0
    except SystemExit as exc:
        code = _system_exit_code(exc)
    except KeyboardInterrupt as exc:
        _send_error(exc)
        code = 130
    except BaseException as exc:  # noqa: BLE001 -- whatever the cell raised is its error
        _send_error(exc)
        code = 1
    try:
        show_open_figures(skip_shown=True)
    except KeyboardInterrupt as exc:
        _send_error(exc)
        code = 130
    except Exception as exc:  # noqa: BLE001 -- drawing the cell's figures may fail in any way
        _send_error(exc)
        code = code or 1
    return code


def _compile_cell(source):
    """Return (code for all but a final expression, code for that expression or None)."""
    import _ast

    flags = getattr(_ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
    tree = compile(source, CELL_FILENAME, "exec", flags | _ast.PyCF_ONLY_AST, True)
    last = None
    if tree.body and isinstance(tree.body[-1], _ast.Expr):
        node = tree.body.pop()
        if not _followed_by_semicolon(node):
            last = compile(_ast.Expression(node.value), CELL_FILENAME, "eval", flags, True)
        else:
            tree.body.append(node)
    return compile(tree, CELL_FILENAME, "exec", flags, True), last


def _followed_by_semicolon(node):
    end_line = getattr(node, "end_lineno", None)
    if end_line is None or end_line > len(_source_lines):
        return False
    rest = _source_lines[end_line - 1].encode("utf-8")[node.end_col_offset :]
    return rest.decode("utf-8", "replace").lstrip().startswith(";")


def _run_code(code, namespace, loop):
    if code.co_flags & _CO_COROUTINE:
        import asyncio

        if not loop:
            loop.append(asyncio.new_event_loop())
            asyncio.set_event_loop(loop[0])
        return loop[0].run_until_complete(eval(code, namespace))
    return eval(code, namespace)


def _close_loop(loop):
    import asyncio

    try:
        tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except BaseException:  # noqa: BLE001 -- the cell's tasks may misbehave in any way while cancelled
        pass
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def _system_exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # noqa: BLE001 -- the cell may have replaced sys.stderr with anything
        pass
    return 1


def _safe_str(obj):
    try:
        return str(obj)
    except BaseException:  # noqa: BLE001 -- a cell's object's __str__ may raise anything, even SystemExit
        return f"<unprintable {type(obj).__name__} object>"


def _send_error(exc, note=None):
    try:
        lines = format_traceback(exc)
    except BaseException:  # noqa: BLE001 -- a cell's exception may break traceback formatting in any way
        lines = [f"{type(exc).__name__}: {_safe_str(exc)}"]
    if note:
        lines.insert(0, note)
    _send(
        {
            "type": "error",
            "ename": type(exc).__name__,
            "evalue": _safe_str(exc),
            "traceback": lines,
        }
    )


def format_traceback(exc):
    """Return the traceback of *exc* as plain-text lines, without the runner's own frames.

    Each chained exception's stack starts at its first cell frame; a SyntaxError in the cell
    shows the offending line and the caret.
    """
    import traceback

    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    todo, seen = [te], set()
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.stack = traceback.StackSummary.from_list(_cell_frames(current.stack))
        todo.extend(t for t in (current.__cause__, current.__context__) if t is not None)
        todo.extend(getattr(current, "exceptions", None) or ())
    return "".join(te.format()).splitlines()


def _cell_frames(stack):
    runner_file = _cell_frames.__code__.co_filename
    frames = list(stack)
    for i, frame in enumerate(frames):
        if frame.filename == CELL_FILENAME:
            frames = frames[i:]
            break
    return [frame for frame in frames if frame.filename != runner_file]


if __name__ == "__main__":
    main()
