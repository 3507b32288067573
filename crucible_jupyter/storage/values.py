"""Values as storage keeps them: text made storable, event payloads as JSON, listing
cursors, execution ids checked, and a stored row turned back into an :class:`Execution`.
Pure functions, no database."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from ..errors import InvalidRequest, NotFound
from ..models import Execution, ExecutionRequest, NotebookRef, Priority, Resources, Status
from ..protocol import clean_utf8
from .schema import ExecutionRow

#: Column names of the executions table, in the order rows are read (``r[0]`` is the id).
EX_NAMES = tuple(c.name for c in ExecutionRow.__table__.c)
#: Longest execution id accepted (a UUID's 36 characters).
MAX_ID_LEN = 36
_CURSOR_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_HOW_TO_LIST = "list recent ids with `crucible history` or GET crucible/api/executions"


def clean_text(value: str) -> str:
    """``value`` made storable in any database: NUL bytes and lone surrogates escaped.

    Valid text is returned unchanged (the same object); only broken text is rewritten,
    with ``backslashreplace`` (a lone ``\\udc80`` becomes the six characters ``\\udc80``).
    """
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    return clean_utf8(value)


def clean_json(value: Any, clean: Any = clean_text) -> Any:
    """``value`` (JSON-like) with every string, keys included, passed through ``clean``."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(str(k)): clean_json(v, clean) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v, clean) for v in value]
    return value


def dump_payload(data: dict[str, Any]) -> str:
    """Event data as compact JSON text; lone surrogates are escaped, never a crash."""
    out = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        out = json.dumps(
            clean_json(data, clean_utf8),  # JSON escapes NUL itself (\u0000)
            ensure_ascii=False,
            separators=(",", ":"),
            default=str,
        )
    return out


def valid_id(execution_id: Any) -> bool:
    """Whether ``execution_id`` is text of 1 to MAX_ID_LEN storable characters."""
    if not isinstance(execution_id, str) or not 0 < len(execution_id) <= MAX_ID_LEN:
        return False
    return clean_text(execution_id) == execution_id


def not_found(execution_id: Any) -> NotFound:
    """The NotFound an unknown execution id gets (also what the API answers for an execution
    the caller may not see, so that its existence is not leaked)."""
    shown = repr(execution_id)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return NotFound(f"no execution with id {shown}; {_HOW_TO_LIST}", field="id")


def encode_cursor(created_at: int, execution_id: str) -> str:
    """The opaque, URL-safe cursor that resumes a listing after this (created_at, id)."""
    raw = json.dumps([created_at, execution_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Inverse of :func:`encode_cursor`; any other string raises InvalidRequest."""
    bad = InvalidRequest(
        "cursor is not valid: pass the next_cursor value of a previous page unchanged,"
        " or leave it out to start from the newest execution",
        field="cursor",
    )
    if not isinstance(cursor, str) or not _CURSOR_RE.match(cursor):
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not valid_id(value[1])
    ):
        raise bad
    return value[0], value[1]


def parse_statuses(status: Any) -> list[str]:
    """``status`` (one or several) as stored values; an unknown one raises InvalidRequest."""
    items = [status] if isinstance(status, (str, Status)) else list(status)
    out = []
    for item in items:
        try:
            out.append(Status(item).value)
        except ValueError:
            raise InvalidRequest(
                f"status {item!r} is not one of {', '.join(s.value for s in Status)}",
                field="status",
            ) from None
    return out


def check_ms(**values: Any) -> None:
    """Raise InvalidRequest naming the first of ``values`` (epoch ms) that is not an int."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"{name} must be an integer, not {value!r}", field=name)


def opt_text(value: str | None) -> str | None:
    """``value`` made storable (:func:`clean_text`), None kept."""
    return None if value is None else clean_text(value)


def execution_from_row(row: Any, tags: tuple[str, ...]) -> Execution:
    """The :class:`Execution` a row of the executions table (columns as EX_NAMES) holds."""
    r = dict(zip(EX_NAMES, row, strict=True))  # dict access: much cheaper than Row attributes
    request = ExecutionRequest(
        code=r["code"],
        language=r["language"],
        timeout=r["timeout"],
        priority=Priority(r["priority"]),
        resources=Resources(cpu=r["cpu"], memory=r["memory"]),
        tags=tags,
        env=dict(r["env"] or {}),
        notebook=NotebookRef(
            path=r["notebook_path"], cell_id=r["cell_id"], kernel_id=r["kernel_id"]
        ),
        name=r["name"],
        backend=r["requested_backend"],
        image=r["image"],
    )
    return Execution(
        id=r["id"],
        request=request,
        user=r["user"],
        status=Status(r["status"]),
        created_at=r["created_at"],
        started_at=r["started_at"],
        finished_at=r["finished_at"],
        exit_code=r["exit_code"],
        reason=r["reason"],
        backend=r["backend"],
        isolation=r["isolation"],
        output_bytes=r["output_bytes"],
        truncated=bool(r["truncated"]),
        dropped_bytes=r["dropped_bytes"],
        dispatcher_id=r["dispatcher_id"],
    )
