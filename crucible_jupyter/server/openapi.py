"""The OpenAPI 3.0 document of the crucible API, served at ``crucible/api/openapi.json``.

It is the reference for clients and is checked against the live server by schemathesis
(``tests/integration/test_openapi.py``): every status the server can answer is listed and every
response body matches its schema. Bounds that depend on configuration (timeouts, CPU, memory,
images, backends) come from the running dispatcher's limits.
"""

from __future__ import annotations

from typing import Any

from .._version import __version__
from ..models import CONTROL_CHARS, SIZE_PATTERN, Limits, Priority, Status, format_bytes
from ..protocol import TAG_PATTERN

_RESERVED_ENV = "^([Cc][Rr][Uu][Cc][Ii][Bb][Ll][Ee]_|[Ll][Dd]_|[Pp][Yy][Tt][Hh][Oo][Nn])"
_TAG = TAG_PATTERN
_NO_NUL = "^[^\\x00]*$"
_NO_CONTROL = f"^[^{CONTROL_CHARS}]*$"


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


_ERRORS = {
    "400": "Malformed request: bad JSON, wrong type, value out of range, unknown field"
    " or query parameter",
    "403": "Not authenticated, or not authorized on resource 'crucible'",
    "404": "No execution with that id (or one of another user's)",
    "409": "The execution's state forbids the action (it already finished)",
    "413": "The body or the code is over its size limit",
    "422": "The language is not supported",
    "429": "The caller already has as many executions queued as one user may"
    " (max_queued_per_user); wait for some to start, or cancel some",
    "503": "The dispatcher or its storage is unavailable; retry later",
}


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _error_response(_ERRORS[code]) for code in codes}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_ID_PARAM = {
    "name": "execution_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Execution id (UUIDv7 text); anything else is a 404",
}

_TIME = {
    "oneOf": [
        {"type": "integer", "minimum": 0, "maximum": 2**53},
        {"type": "string", "format": "date-time"},
    ]
}


def _request_schema(limits: Limits) -> dict[str, Any]:
    cpu = {
        "oneOf": [
            {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": limits.max_cpu},
            {"type": "string", "pattern": "^[1-9][0-9]{0,2}m$", "description": "millicores"},
        ]
    }
    memory = {
        "oneOf": [
            {"type": "integer", "minimum": limits.min_memory, "maximum": limits.max_memory},
            {
                "type": "string",
                "pattern": SIZE_PATTERN,
                "description": "a size such as 512Mi, 2Gi or 1G: a number and an optional unit"
                " in any case (Ki, Mi, Gi, Ti: powers of 1024; K, M, G, T, KB, MB, GB: powers"
                " of 1000; none or B: bytes); refused (400) outside"
                f" {format_bytes(limits.min_memory)}..{format_bytes(limits.max_memory)}",
            },
        ]
    }
    backend: dict[str, Any] = {"type": "string", "maxLength": 64, "pattern": _NO_NUL}
    if limits.backends:
        backend = {"type": "string", "enum": list(limits.backends)}
    image: dict[str, Any] = {"type": "string", "maxLength": 256, "pattern": _NO_NUL}
    if limits.images:
        image = {"type": "string", "enum": list(limits.images)}
    return {
        "type": "object",
        "required": ["code"],
        "additionalProperties": False,
        "description": "One cell to run. Unknown fields are refused (400).",
        "properties": {
            "code": {
                "type": "string",
                "pattern": _NO_NUL,
                "description": f"Source of the cell; at most {limits.max_code_bytes} UTF-8 bytes"
                " (else 413), no NUL byte.",
            },
            "language": {"type": "string", "enum": ["python"], "description": "Else 422."},
            "timeout": {
                "type": "number",
                "exclusiveMinimum": True,
                "minimum": 0,
                "maximum": limits.max_timeout,
                "description": f"Wall-clock seconds (default {limits.default_timeout:g}).",
            },
            "priority": {"type": "string", "enum": [p.value for p in Priority]},
            "resources": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"cpu": cpu, "memory": memory},
            },
            "cpu": cpu,
            "memory": memory,
            "tags": {
                "type": "array",
                "maxItems": limits.max_tags,
                "items": {"type": "string", "pattern": _TAG},
            },
            "env": {
                "type": "object",
                "maxProperties": limits.max_env_vars,
                "propertyNames": {
                    "pattern": "^[A-Za-z_][A-Za-z0-9_]*$",
                    "not": {"pattern": _RESERVED_ENV},
                },
                "additionalProperties": {"type": "string", "pattern": _NO_NUL},
                "description": "Names starting with CRUCIBLE_, LD_ or PYTHON are reserved.",
            },
            "notebook": {"$ref": "#/components/schemas/NotebookRef"},
            "name": {"type": "string", "maxLength": 200, "pattern": _NO_CONTROL},
            "backend": backend,
            "image": image,
        },
    }


def openapi_document(
    api_root: str,
    limits: Limits | None = None,
    *,
    max_page_size: int = 500,
    auth: str = "jupyter",
) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document, with ``servers`` at ``api_root`` (``{base_url}crucible/api``),
    request bounds from ``limits`` and a page size of at most ``max_page_size``. ``auth``
    names the host: ``"jupyter"`` (the server extension) or ``"hub"`` (``crucible serve``:
    JupyterHub tokens, 401 without one)."""
    doc = _document(api_root, limits, max_page_size)
    if auth == "hub":
        _for_hub(doc)
    return doc


_HUB_ERRORS = {
    "401": "No JupyterHub token, or one the hub does not know",
    "403": "The token lacks the scope that grants access to this service",
    "404": "No execution with that id, or one of another user's",
    "503": "The dispatcher, its storage or the JupyterHub API is unavailable; retry later",
}


def _for_hub(doc: dict[str, Any]) -> None:
    """Rewrite ``doc`` for the standalone service: hub token authentication, 401 answers."""
    doc["info"]["description"] = (
        "Run notebook cells as isolated, recorded executions that stream their output live."
        " Authenticate with a JupyterHub API token (Authorization: token ...) that holds"
        " access:services!service=<this service>; you see your own executions only (holders"
        " of the service's admin scope see all)."
    )
    doc["security"] = [{"HubToken": []}]
    doc["components"]["securitySchemes"] = {
        "HubToken": {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "'token <JupyterHub API token>' ($JUPYTERHUB_API_TOKEN in a user"
            " server)",
        }
    }
    for item in doc["paths"].values():
        for name, operation in item.items():
            if name == "parameters":
                continue
            responses = operation["responses"]
            for code, text in _HUB_ERRORS.items():
                if code in responses or code == "401":
                    responses[code] = _error_response(text)


def _document(api_root: str, limits: Limits | None, max_page_size: int) -> dict[str, Any]:
    limits = limits or Limits()
    statuses = [s.value for s in Status]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "crucible_jupyter",
            "version": __version__,
            "description": "Run notebook cells as isolated, recorded executions that stream"
            " their output live. Authenticate like any Jupyter server API request"
            " (Authorization: token ...), or from a kernel of this server with X-Crucible-Token.",
        },
        "servers": [{"url": api_root}],
        "security": [{"JupyterToken": []}, {"KernelToken": []}],
        "paths": {
            "/executions": {
                "post": {
                    "operationId": "createExecution",
                    "summary": "Submit one cell; it is stored as queued before anything runs",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ExecutionRequest"}
                            }
                        },
                    },
                    "responses": {
                        "201": {
                            **_json("Execution", "Accepted and queued"),
                            "headers": {
                                "Location": {
                                    "schema": {"type": "string"},
                                    "description": "URL of the new execution",
                                }
                            },
                        },
                        **_errors("400", "403", "413", "422", "429", "503"),
                    },
                },
                "get": {
                    "operationId": "listExecutions",
                    "summary": "A page of executions, newest first",
                    "parameters": [
                        _query("user", {"type": "string", "maxLength": 256}, "Only this user's"),
                        _query("status", {"type": "string", "enum": statuses}, "Only this state"),
                        _query("tag", {"type": "string", "pattern": _TAG}, "Only with this tag"),
                        _query("since", _TIME, "Created at or after (ms since epoch or ISO 8601)"),
                        _query("until", _TIME, "Created before (ms since epoch or ISO 8601)"),
                        _query(
                            "cursor",
                            {"type": "string", "maxLength": 512},
                            "next_cursor of the previous page",
                        ),
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": max_page_size},
                            "Page size (default 50)",
                        ),
                    ],
                    "responses": {
                        "200": _json("ExecutionPage", "One page"),
                        **_errors("400", "403", "503"),
                    },
                },
            },
            "/executions/{execution_id}": {
                "parameters": [_ID_PARAM],
                "get": {
                    "operationId": "getExecution",
                    "summary": "One execution with its stored events (its outputs)",
                    "parameters": [
                        _query(
                            "after",
                            {"type": "integer", "minimum": -1, "maximum": 2**53},
                            "Only events with seq > after",
                        ),
                    ],
                    "responses": {
                        "200": _json("ExecutionWithEvents", "The execution"),
                        **_errors("400", "403", "404", "503"),
                    },
                },
                "delete": {
                    "operationId": "deleteExecution",
                    "summary": "Cancel the execution (the record is kept)",
                    "responses": {
                        "200": _json("Execution", "Cancelled, or being cancelled"),
                        **_errors("403", "404", "409", "503"),
                    },
                },
            },
            "/executions/{execution_id}/cancel": {
                "parameters": [_ID_PARAM],
                "post": {
                    "operationId": "cancelExecution",
                    "summary": "Cancel a queued or running execution",
                    "responses": {
                        "200": _json("Execution", "Cancelled, or being cancelled"),
                        **_errors("403", "404", "409", "503"),
                    },
                },
            },
            "/executions/{execution_id}/stream": {
                "parameters": [_ID_PARAM],
                "get": {
                    "operationId": "streamExecution",
                    "summary": "WebSocket: every Event after `after` as one JSON message;"
                    " closes (1000) after the terminal status event",
                    "parameters": [
                        _query(
                            "after",
                            {"type": "integer", "minimum": -1, "maximum": 2**53},
                            "Resume after this seq",
                        ),
                    ],
                    "responses": {
                        "101": {
                            "description": "Switching to WebSocket; messages are Event objects"
                        },
                        **_errors("400", "403", "404", "503"),
                    },
                },
            },
            "/changes": {
                "get": {
                    "operationId": "watchChanges",
                    "summary": "WebSocket: one {id, status, user} message each time an execution"
                    " of this server is queued, starts, runs or ends (sent once the record"
                    " says so); {overflow: true} where a slow client lost some. Open until"
                    " the server stops",
                    "responses": {
                        "101": {
                            "description": "Switching to WebSocket; messages are status changes"
                        },
                        **_errors("400", "403", "503"),
                    },
                },
            },
            "/queue": {
                "get": {
                    "operationId": "queueStatus",
                    "summary": "Queue depth per priority, running, capacity, and a position",
                    "parameters": [
                        _query(
                            "execution_id",
                            {"type": "string"},
                            "Also report this execution's position",
                        ),
                    ],
                    "responses": {
                        "200": _json("QueueStatus", "The queue"),
                        **_errors("400", "403", "404", "503"),
                    },
                }
            },
            "/stats": {
                "get": {
                    "operationId": "statistics",
                    "summary": "Counts per status and durations",
                    "parameters": [
                        _query("user", {"type": "string", "maxLength": 256}, "Only this user's"),
                        _query("since", _TIME, "Created at or after"),
                    ],
                    "responses": {
                        "200": _json("Stats", "Statistics"),
                        **_errors("400", "403", "503"),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "200 when the dispatcher runs",
                    "responses": {"200": _json("Health", "Up"), **_errors("403", "503")},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.0 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **_errors("403"),
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "JupyterToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "'token <jupyter server token>' or the server's own login",
                },
                "KernelToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Crucible-Token",
                    "description": "CRUCIBLE_TOKEN, handed to kernels this server starts",
                },
            },
            "schemas": _schemas(limits, statuses),
        },
    }


def _schemas(limits: Limits, statuses: list[str]) -> dict[str, Any]:
    integer = {"type": "integer"}
    text = {"type": "string"}
    return {
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string", "description": "Kind, e.g. InvalidRequest, NotFound"},
                "message": {"type": "string", "description": "What was wrong and how to fix it"},
                "field": {"type": "string", "description": "The offending field, when one is"},
                "reason": {"type": "string", "description": "HTTP reason phrase"},
            },
        },
        "NotebookRef": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "path": _nullable({"type": "string", "maxLength": 4096, "pattern": _NO_NUL}),
                "cell_id": _nullable({"type": "string", "maxLength": 256, "pattern": _NO_NUL}),
                "kernel_id": _nullable({"type": "string", "maxLength": 256, "pattern": _NO_NUL}),
            },
        },
        "ExecutionRequest": _request_schema(limits),
        "Execution": {
            "type": "object",
            "required": ["id", "user", "status", "created_at", "code", "notebook", "resources"],
            "properties": {
                "id": text,
                "user": text,
                "status": {"type": "string", "enum": statuses},
                "created_at": integer,
                "started_at": _nullable(integer),
                "finished_at": _nullable(integer),
                "duration_ms": _nullable(integer),
                "exit_code": _nullable(integer),
                "reason": _nullable(text),
                "backend": _nullable(text),
                "isolation": _nullable(text),
                "output_bytes": integer,
                "truncated": {"type": "boolean"},
                "dropped_bytes": integer,
                "code": text,
                "language": text,
                "timeout": {"type": "number"},
                "priority": {"type": "string", "enum": [p.value for p in Priority]},
                "tags": {"type": "array", "items": text},
                "name": _nullable(text),
                "image": _nullable(text),
                "resources": {
                    "type": "object",
                    "required": ["cpu", "memory"],
                    "properties": {"cpu": {"type": "number"}, "memory": integer},
                },
                "env": {"type": "array", "items": text, "description": "Names only"},
                "notebook": {
                    "type": "object",
                    "properties": {
                        "path": _nullable(text),
                        "cell_id": _nullable(text),
                        "kernel_id": _nullable(text),
                    },
                },
            },
        },
        "Event": {
            "type": "object",
            "required": ["seq", "t", "type"],
            "description": "A status change (type 'status': status, position; when it ends:"
            " reason, exit_code, duration_ms, and dropped_bytes if output was cut) or a runner"
            " frame (stream, display_data, update_display_data, execute_result, error,"
            " clear_output).",
            "properties": {
                "seq": {"type": "integer", "minimum": 0},
                "t": integer,
                "type": text,
                "status": {"type": "string", "enum": statuses},
                "name": text,
                "text": text,
                "data": {"type": "object"},
                "metadata": {"type": "object"},
                "ename": text,
                "evalue": text,
                "traceback": {"type": "array", "items": text},
                "dropped_bytes": {"type": "integer", "minimum": 0},
            },
        },
        "ExecutionWithEvents": {
            "allOf": [
                {"$ref": "#/components/schemas/Execution"},
                {
                    "type": "object",
                    "required": ["events"],
                    "properties": {
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}
                    },
                },
            ]
        },
        "ExecutionPage": {
            "type": "object",
            "required": ["executions", "next_cursor"],
            "properties": {
                "executions": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/Execution"},
                },
                "next_cursor": _nullable(text),
            },
        },
        "QueueStatus": {
            "type": "object",
            "description": "Depth per priority, running count, capacity and, when asked, position",
            "properties": {
                "depth": {"type": "object", "additionalProperties": integer},
                "running": integer,
                "capacity": integer,
                "position": _nullable(integer),
            },
        },
        "Stats": {"type": "object", "description": "Counts per status, durations"},
        "Health": {
            "type": "object",
            "required": ["status", "version", "busy"],
            "properties": {
                "status": {"type": "string", "enum": ["ok"]},
                "version": text,
                "busy": {"type": "boolean"},
                "queue": {"$ref": "#/components/schemas/QueueStatus"},
            },
        },
    }
