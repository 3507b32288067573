"""Raw API calls: JSON dicts instead of generated models, errors still raised.

kubernetes_asyncio returns the bare HTTP response when a call is made with
``_preload_content=False`` — whatever its status. These helpers restore the usual
contract: a non-2xx status raises ``ApiException`` (with the server's message) and its
connection is released, never leaked.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException


async def raw(call: Awaitable[Any]) -> Any:
    """Await a ``_preload_content=False`` call; the response if 2xx, else ApiException."""
    resp = await call
    if 200 <= resp.status < 300:
        return resp
    try:
        body = await resp.read()
    finally:
        resp.release()
    message = resp.reason
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(body).get("message") or message
    error = ApiException(status=resp.status, reason=message)
    error.body = body
    raise error


async def raw_json(call: Awaitable[Any]) -> Any:
    """Await a ``_preload_content=False`` call and decode its JSON body."""
    resp = await raw(call)
    return json.loads(await resp.read())
