"""``crucible doctor`` in a user server in remote mode: does the crucible service answer, and
does this server's token carry the scope it needs?

Each check is ``{"name", "ok", "detail", "fix"?}``, like the backends' checks.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

_SCOPE_FIX = (
    "ask your JupyterHub administrator to give user servers the scope"
    " access:services!service=crucible (c.Spawner.server_token_scopes, and the same scope"
    " for users through a role), then restart your server"
)


async def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"token {token}"} if token else {}
    request = HTTPRequest(url, headers=headers, connect_timeout=10, request_timeout=30)
    try:
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
    except OSError as e:  # refused, unreachable, no such host: raised despite raise_error
        return 599, str(e) or type(e).__name__
    if response.code == 599:
        return 599, str(response.error)
    try:
        return response.code, json.loads(response.body or b"null")
    except ValueError:
        return response.code, (response.body or b"")[:200].decode("utf-8", "replace")


async def service_checks(service_url: str, token: str | None) -> list[dict[str, Any]]:
    """Whether the service at ``service_url`` is ready, and whether ``token`` may use it."""
    base = service_url.rstrip("/") + "/"
    checks: list[dict[str, Any]] = []
    code, body = await _get(base + "readyz")
    if code == 200:
        checks.append({"name": "service", "ok": True, "detail": f"{base} answers and is ready"})
    elif code == 503 and isinstance(body, dict):
        checks.append(
            {
                "name": "service",
                "ok": False,
                "detail": f"{base} answers but is not ready: {body.get('reason')}",
                "fix": "retry in a moment; if it stays so, tell your JupyterHub administrator",
            }
        )
    else:
        detail = (
            f"the crucible service at {base} is unreachable ({body})"
            if code == 599
            else f"{base} does not answer as a crucible service ({code}: {body})"
        )
        checks.append(
            {
                "name": "service",
                "ok": False,
                "detail": detail,
                "fix": "check CRUCIBLE_SERVICE_URL (c.CrucibleApp.service_url); ask your"
                " JupyterHub administrator whether `crucible serve` runs",
            }
        )
        return checks
    if not token:
        checks.append(
            {
                "name": "token",
                "ok": False,
                "detail": "no JupyterHub token (JUPYTERHUB_API_TOKEN is empty)",
                "fix": "run this inside a JupyterHub user server, or set JUPYTERHUB_API_TOKEN",
            }
        )
        return checks
    code, body = await _get(base + "api/health", token)
    message = body.get("message") if isinstance(body, dict) else body
    if code == 200:
        checks.append(
            {"name": "token", "ok": True, "detail": "the token is accepted by the service"}
        )
    elif code == 403:
        checks.append({"name": "token", "ok": False, "detail": message, "fix": _SCOPE_FIX})
    elif code == 401:
        checks.append(
            {
                "name": "token",
                "ok": False,
                "detail": message,
                "fix": "restart your server to get a fresh token",
            }
        )
    else:
        checks.append(
            {
                "name": "token",
                "ok": False,
                "detail": f"the service answered {code}: {message}",
                "fix": "retry in a moment; if it stays so, tell your JupyterHub administrator",
            }
        )
    return checks


async def doctor(service_url: str, as_json: bool) -> int:
    """Print the checks (text or JSON); 0 when all pass."""
    checks = await service_checks(service_url, os.environ.get("JUPYTERHUB_API_TOKEN"))
    ok = all(c["ok"] for c in checks)
    if as_json:
        report = {"mode": "remote", "service_url": service_url, "checks": checks, "ok": ok}
        print(json.dumps(report))
    else:
        for c in checks:
            print(f"[{'ok  ' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
            if not c["ok"] and c.get("fix"):
                print(f"       fix: {c['fix']}")
        print(f"mode: remote (cells run at the crucible service {service_url})")
    return 0 if ok else 1
