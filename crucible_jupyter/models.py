"""The shapes everything else speaks: requests, executions and the events they produce.

``ExecutionRequest.from_dict`` is the single place where untrusted input is validated;
every refusal is an :class:`~crucible_jupyter.errors.InvalidRequest` (or a subclass) whose
message says what was wrong and how to fix it.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .errors import InvalidRequest, RequestTooLarge, UnsupportedLanguage
from .protocol import RESERVED_ENV_PREFIXES, TERMINAL_STATUSES, is_tag, is_utf8


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def new_execution_id() -> str:
    """A new execution id: a UUIDv7-style string, so ids sort by creation time."""
    ms = now_ms()
    rand = secrets.token_bytes(10)
    b = ms.to_bytes(6, "big") + bytes([0x70 | (rand[0] & 0x0F), rand[1]])
    b += bytes([0x80 | (rand[2] & 0x3F)]) + rand[3:10]
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Status(str, Enum):
    """Where an execution is in its life: ``queued → starting → running → terminal``."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the execution can no longer change."""
        return self in TERMINAL


#: The final states (:data:`crucible_jupyter.protocol.TERMINAL_STATUSES`) as members.
TERMINAL = frozenset(Status(value) for value in TERMINAL_STATUSES)


class Priority(str, Enum):
    """Scheduling priority; ``high`` runs first, aging keeps ``low`` from starving."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low."""
        return {"high": 0, "normal": 1, "low": 2}[self.value]


SUPPORTED_LANGUAGES = ("python",)

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "b": 1,
}
_SPACES = r"[ \t\n\r\f\v]*"
_SIZE_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def _any_case(unit: str) -> str:
    """``ki`` → ``[Kk][Ii]``: a unit in any case, without a case-insensitive flag (which
    ECMA-262 patterns in JSON Schema cannot carry)."""
    return "".join(f"[{c.upper()}{c.lower()}]" for c in unit)


#: Every string :func:`parse_bytes` accepts, and only those, as a regular expression that
#: means the same in Python and ECMA-262 (the OpenAPI document publishes it): a decimal
#: number, then an optional unit of ``_UNITS`` in any case, spaces allowed around each.
#: (Whether the size is within an execution's limits is checked after parsing.)
SIZE_PATTERN = (
    f"^{_SPACES}{_SIZE_NUMBER}{_SPACES}"
    f"((?:{'|'.join(_any_case(u) for u in sorted(_UNITS, key=len, reverse=True) if u)})?)"
    f"{_SPACES}$"
)
_SIZE_RE = re.compile(SIZE_PATTERN)
#: A number and any letters: what a size with an unknown unit looks like (for the message).
_SIZE_SHAPE_RE = re.compile(f"^{_SPACES}{_SIZE_NUMBER}{_SPACES}([a-zA-Z]*){_SPACES}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Control characters (C0, DEL, C1) as a regular-expression class body, for a one-line name.
CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"
_CONTROL_RE = re.compile(f"[{CONTROL_CHARS}]")
#: The largest size a request may name, in bytes (what a signed 64-bit count holds).
_MAX_BYTES = 2**63 - 1


def _shown(value: Any, width: int = 60) -> str:
    """``value`` as a refusal quotes it: its repr, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _as_float(value: int | float) -> float:
    """A number as a float; an integer too large for a float becomes an infinity."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def parse_bytes(value: Any, *, what: str = "memory") -> int:
    """Parse a size such as ``512Mi``, ``1G``, ``2048`` (bytes) into an integer byte count."""
    if isinstance(value, bool):
        raise InvalidRequest(
            f"{what} must be a size such as '512Mi' or a number of bytes", field=what
        )
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value):
        n = int(value)
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = float(m.group(1)) * _UNITS[m.group(2).lower()]
        n = int(size) if math.isfinite(size) else _MAX_BYTES + 1
    elif isinstance(value, str) and (m := _SIZE_SHAPE_RE.match(value)):
        raise InvalidRequest(
            f"{what}: unknown unit {_shown(m.group(2))}; use Ki, Mi, Gi (or K, M, G)",
            field=what,
        )
    else:
        raise InvalidRequest(
            f"{what} must be a size such as '512Mi' or a number of bytes, not {_shown(value)}",
            field=what,
        )
    if n <= 0:
        raise InvalidRequest(f"{what} must be greater than zero", field=what)
    if n > _MAX_BYTES:
        raise InvalidRequest(
            f"{what} {_shown(value)} is far too large; use a size such as '512Mi' or '2Gi'",
            field=what,
        )
    return n


#: The smallest CPU share a request may ask for: one millicore, Kubernetes' unit.
MIN_CPU = 0.001


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _decimal(text: str) -> float:
    """A number written in plain ASCII decimal (float() would also take '1_000', 'inf' or
    other scripts' digits); ValueError otherwise."""
    if not _DECIMAL.fullmatch(text):
        raise ValueError(text)
    return float(text)


def parse_cpu(value: Any) -> float:
    """Parse a CPU amount such as ``0.5``, ``2`` or ``500m`` (millicores) into cores.

    A number too large for a float is ``inf``: callers compare it with their maximum."""
    if isinstance(value, bool):
        raise InvalidRequest("cpu must be a number of cores such as 0.5 or '500m'", field="cpu")
    if isinstance(value, (int, float)):
        cores = _as_float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            cores = _decimal(text[:-1]) / 1000 if text.endswith("m") else _decimal(text)
        except ValueError:
            cores = math.nan
    else:
        raise InvalidRequest("cpu must be a number of cores such as 0.5 or '500m'", field="cpu")
    if math.isnan(cores):
        raise InvalidRequest(
            f"cpu must be a number of cores such as 0.5 or '500m', not {_shown(value)}",
            field="cpu",
        )
    if cores <= 0:
        raise InvalidRequest("cpu must be greater than zero", field="cpu")
    if cores < MIN_CPU:
        raise InvalidRequest(
            f"cpu {cores:g} is under the minimum of {MIN_CPU:g} cores ('1m')", field="cpu"
        )
    return cores


def format_bytes(n: int) -> str:
    """``1048576`` → ``'1 MiB'``: a size as a person reads it."""
    size: float = n
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    return f"{size} B"  # pragma: no cover


@dataclass(frozen=True)
class Limits:
    """The bounds a request is validated against; the dispatcher builds one from its config."""

    max_code_bytes: int = 1 << 20
    default_timeout: float = 60.0
    max_timeout: float = 3600.0
    default_cpu: float = 1.0
    max_cpu: float = 4.0
    default_memory: int = 512 << 20
    max_memory: int = 8 << 30
    min_memory: int = 16 << 20
    max_env_vars: int = 64
    max_env_bytes: int = 64 << 10
    max_tags: int = 32
    images: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class Resources:
    """CPU in cores and memory in bytes granted to one execution."""

    cpu: float
    memory: int


@dataclass(frozen=True)
class NotebookRef:
    """Where a cell came from: notebook path, cell id, kernel id (all optional)."""

    path: str | None = None
    cell_id: str | None = None
    kernel_id: str | None = None


@dataclass(frozen=True)
class ExecutionRequest:
    """A validated request to run one cell. Build it with :meth:`from_dict`."""

    code: str
    language: str = "python"
    timeout: float = 60.0
    priority: Priority = Priority.NORMAL
    resources: Resources = field(default_factory=lambda: Resources(1.0, 512 << 20))
    tags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    notebook: NotebookRef = field(default_factory=NotebookRef)
    name: str | None = None
    backend: str | None = None
    image: str | None = None

    @classmethod
    def from_dict(cls, data: Any, limits: Limits | None = None) -> ExecutionRequest:
        """Validate untrusted ``data`` (a decoded JSON object) against ``limits``.

        Raises InvalidRequest (or RequestTooLarge / UnsupportedLanguage) naming the field
        and saying how to fix it. Unknown fields are refused so typos do not pass silently.
        """
        limits = limits or Limits()
        if not isinstance(data, dict):
            raise InvalidRequest("the request body must be a JSON object with at least 'code'")
        known = {
            "code",
            "language",
            "timeout",
            "priority",
            "resources",
            "tags",
            "env",
            "notebook",
            "name",
            "backend",
            "image",
            "cpu",
            "memory",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            names = ", ".join(_shown(k, 40) for k in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise InvalidRequest(
                f"unknown field(s) {names}{more}; allowed fields are {', '.join(sorted(known))}",
                field=str(unknown[0])[:64],
            )
        code = _validate_code(data.get("code"), limits)
        language = data.get("language", "python")
        if not isinstance(language, str) or language.lower() not in SUPPORTED_LANGUAGES:
            raise UnsupportedLanguage(
                f"language {_shown(language)} is not supported;"
                f" supported: {', '.join(SUPPORTED_LANGUAGES)}",
                field="language",
            )
        timeout = _validate_timeout(data.get("timeout"), limits)
        priority = _validate_priority(data.get("priority", "normal"))
        resources = _validate_resources(data, limits)
        tags = _validate_tags(data.get("tags", []), limits)
        env = _validate_env(data.get("env", {}), limits)
        notebook = _validate_notebook(data.get("notebook"))
        name = _validate_name(data.get("name"))
        backend = _optional_text(data.get("backend"), "backend", 64)
        if backend is not None and limits.backends and backend not in limits.backends:
            raise InvalidRequest(
                f"backend {backend!r} is not configured; available: {', '.join(limits.backends)}",
                field="backend",
            )
        image = _optional_text(data.get("image"), "image", 256)
        if image is not None and limits.images and image not in limits.images:
            raise InvalidRequest(
                f"image {image!r} is not allowed; allowed images: {', '.join(limits.images)}",
                field="image",
            )
        return cls(
            code=code,
            language=language.lower(),
            timeout=timeout,
            priority=priority,
            resources=resources,
            tags=tags,
            env=env,
            notebook=notebook,
            name=name,
            backend=backend,
            image=image,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` accepts back."""
        out = asdict(self)
        out["priority"] = self.priority.value
        out["tags"] = list(self.tags)
        return out


def _validate_code(code: Any, limits: Limits) -> str:
    if code is None:
        raise InvalidRequest("'code' is required: the source of the cell to run", field="code")
    if not isinstance(code, str):
        raise InvalidRequest("'code' must be a string of UTF-8 text", field="code")
    if "\x00" in code:
        raise InvalidRequest("'code' contains a NUL byte (\\x00); remove it", field="code")
    try:
        size = len(code.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidRequest(
            "'code' contains a lone surrogate and is not valid UTF-8 text", field="code"
        ) from None
    if size > limits.max_code_bytes:
        raise RequestTooLarge(
            f"'code' is {format_bytes(size)},"
            f" over the limit of {format_bytes(limits.max_code_bytes)};"
            " load large data from a file instead of pasting it into the cell",
            field="code",
        )
    return code


def _validate_timeout(value: Any, limits: Limits) -> float:
    if value is None:
        return min(limits.default_timeout, limits.max_timeout)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = _decimal(value.strip())
            except ValueError:
                raise InvalidRequest(
                    f"timeout must be a number of seconds, not {_shown(value)}", field="timeout"
                ) from None
        else:
            raise InvalidRequest("timeout must be a number of seconds", field="timeout")
    value = _as_float(value)
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(
            f"timeout must be greater than 0 seconds (at most {limits.max_timeout:g}),"
            f" got {value!r}",
            field="timeout",
        )
    if value > limits.max_timeout:
        raise InvalidRequest(
            f"timeout {value:g}s is over the maximum of {limits.max_timeout:g}s", field="timeout"
        )
    return float(value)


def _validate_priority(value: Any) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise InvalidRequest(
            f"priority must be one of high, normal, low; got {_shown(value)}", field="priority"
        ) from None


def _validate_resources(data: dict, limits: Limits) -> Resources:
    res = data.get("resources")
    if res is None:
        res = {}
    if not isinstance(res, dict):
        raise InvalidRequest(
            "resources must be an object like {'cpu': 1, 'memory': '512Mi'}", field="resources"
        )
    extra = set(res) - {"cpu", "memory"}
    if extra:
        raise InvalidRequest(
            f"resources: unknown key(s) {_shown(sorted(extra))}; use 'cpu' and 'memory'",
            field="resources",
        )
    for key in ("cpu", "memory"):
        if key in data and key in res:
            raise InvalidRequest(
                f"{key} is given twice, at the top level and in resources; give it once",
                field=key,
            )
    cpu_in = data.get("cpu", res.get("cpu"))
    mem_in = data.get("memory", res.get("memory"))
    cpu = limits.default_cpu if cpu_in is None else parse_cpu(cpu_in)
    memory = limits.default_memory if mem_in is None else parse_bytes(mem_in)
    if cpu > limits.max_cpu:
        raise InvalidRequest(f"cpu {cpu:g} is over the maximum of {limits.max_cpu:g}", field="cpu")
    if memory > limits.max_memory:
        raise InvalidRequest(
            f"memory {format_bytes(memory)} is over the maximum"
            f" of {format_bytes(limits.max_memory)}",
            field="memory",
        )
    if memory < limits.min_memory:
        raise InvalidRequest(
            f"memory {format_bytes(memory)} is under the minimum"
            f" of {format_bytes(limits.min_memory)}",
            field="memory",
        )
    return Resources(cpu=cpu, memory=memory)


def _validate_tags(value: Any, limits: Limits) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest("tags must be a list of strings", field="tags")
    if len(value) > limits.max_tags:
        raise InvalidRequest(f"at most {limits.max_tags} tags are allowed", field="tags")
    for tag in value:
        if not is_tag(tag):
            raise InvalidRequest(
                f"tag {_shown(tag)} is invalid: use 1-64 letters, digits or . _ - : / @ + =",
                field="tags",
            )
    return tuple(dict.fromkeys(value))


def _validate_env(value: Any, limits: Limits) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidRequest("env must be an object mapping names to string values", field="env")
    if len(value) > limits.max_env_vars:
        raise InvalidRequest(f"at most {limits.max_env_vars} environment variables", field="env")
    total = 0
    for name, val in value.items():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise InvalidRequest(
                f"environment variable name {_shown(name)} is invalid: use letters, digits and _,"
                " not starting with a digit",
                field="env",
            )
        if name.upper().startswith(RESERVED_ENV_PREFIXES):
            raise InvalidRequest(
                f"environment variable {name!r} is reserved (names starting with"
                f" {', '.join(RESERVED_ENV_PREFIXES)} cannot be set)",
                field="env",
            )
        if not isinstance(val, str) or "\x00" in val or not is_utf8(val):
            raise InvalidRequest(
                f"env[{name!r}] must be a string of valid UTF-8 text without NUL bytes",
                field="env",
            )
        total += len(name) + len(val.encode("utf-8", "surrogatepass"))
    if total > limits.max_env_bytes:
        raise RequestTooLarge(
            f"environment is {format_bytes(total)}, over {format_bytes(limits.max_env_bytes)}",
            field="env",
        )
    return dict(value)


def _validate_notebook(value: Any) -> NotebookRef:
    if value is None:
        return NotebookRef()
    if not isinstance(value, dict):
        raise InvalidRequest(
            "notebook must be an object with optional path, cell_id, kernel_id", field="notebook"
        )
    extra = set(value) - {"path", "cell_id", "kernel_id"}
    if extra:
        raise InvalidRequest(
            f"notebook: unknown key(s) {_shown(sorted(extra))}; use path, cell_id, kernel_id",
            field="notebook",
        )
    return NotebookRef(
        path=_optional_text(value.get("path"), "notebook.path", 4096),
        cell_id=_optional_text(value.get("cell_id"), "notebook.cell_id", 256),
        kernel_id=_optional_text(value.get("kernel_id"), "notebook.kernel_id", 256),
    )


def _validate_name(value: Any) -> str | None:
    """A one-line label: no control characters (a newline or an escape sequence would break,
    or rewrite, every history listing that shows it)."""
    name = _optional_text(value, "name", 200)
    if name is not None and (bad := _CONTROL_RE.search(name)):
        raise InvalidRequest(
            f"name contains the control character {bad.group()!r}; use one line of plain text",
            field="name",
        )
    return name


def _optional_text(value: Any, name: str, max_len: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value or len(value) > max_len:
        raise InvalidRequest(f"{name} must be text of at most {max_len} characters", field=name)
    if not is_utf8(value):
        raise InvalidRequest(
            f"{name} contains a lone surrogate (such as \\ud800) and is not valid UTF-8 text",
            field=name,
        )
    return value


@dataclass
class Execution:
    """The record of one execution: its request, who sent it, and what became of it.

    Times are integer milliseconds since the epoch. ``isolation`` says which isolation
    was actually used (``bubblewrap``, ``none``, ``kubernetes``...).
    """

    id: str
    request: ExecutionRequest
    user: str = "local"
    status: Status = Status.QUEUED
    created_at: int = field(default_factory=now_ms)
    started_at: int | None = None
    finished_at: int | None = None
    exit_code: int | None = None
    reason: str | None = None
    backend: str = "local"
    isolation: str | None = None
    output_bytes: int = 0
    truncated: bool = False
    dropped_bytes: int = 0
    dispatcher_id: str | None = None

    @property
    def duration_ms(self) -> int | None:
        """Milliseconds from start to finish, when both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the request inlined, without the environment values)."""
        req = self.request.to_dict()
        req["env"] = sorted(req["env"])  # names only: values may be secrets
        return {
            "id": self.id,
            "user": self.user,
            "status": self.status.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_ms": self.duration_ms,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "backend": self.backend,
            "isolation": self.isolation,
            "output_bytes": self.output_bytes,
            "truncated": self.truncated,
            "dropped_bytes": self.dropped_bytes,
            **{
                k: req[k]
                for k in ("code", "language", "timeout", "priority", "tags", "name", "image")
            },
            "resources": req["resources"],
            "env": req["env"],
            "notebook": req["notebook"],
        }


@dataclass(frozen=True)
class Event:
    """One numbered event of an execution: a status change or a frame of output.

    ``type`` is ``status`` or one of the runner frame types (``stream``, ``display_data``,
    ``execute_result``, ``error``...). ``seq`` is assigned by the dispatcher and is dense
    from 0, so a subscriber can resume after the last seq it saw.
    """

    seq: int
    t: int
    type: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"seq", "t", "type", ...data}``."""
        return {"seq": self.seq, "t": self.t, "type": self.type, **self.data}


def owner_tag() -> str:
    """An id for this dispatcher process: ``hostname:pid``."""
    return f"{os.uname().nodename}:{os.getpid()}"
