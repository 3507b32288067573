"""A real JupyterHub with crucible as a hub-managed service (``crucible serve``): started by
:func:`start_hub` (the ``hub`` fixture of tests/hub/conftest.py, and benchmarks/bench_hub.py),
users' servers by :func:`user_server`, kernels driven through the hub by :class:`Kernel`.

``hub`` (session scope) starts ``jupyterhub`` from .venv with the dummy authenticator and the
real configurable-http-proxy (installed by ``dev/setup --tests`` into ``.venv/chp``), in a
temporary directory, listening on 127.0.0.1 only. Its configuration is the one the README
documents: the ``crucible`` service (command ``crucible serve``, local bubblewrap backend,
SQLite in the temporary directory), ``custom:crucible:admin`` declared, the ``user`` role
granted ``access:services!service=crucible``, the ``crucible-admin`` role granting the custom
scope to the user ``admin``. A control service creates the users (alice, bob, admin and
the special ones of ``USERS``) and their API tokens through the hub's REST API, plus a token
of alice's without the access scope. Everything reaches crucible through the hub's proxy at
``/services/crucible/``. User servers (started by tests with :func:`user_server`) run in
remote mode, except carol's (a service on ``Hub.spare_port`` that tests start and kill) and
the user ``embedded``'s (no service: an embedded dispatcher, for the benchmark).

Missing jupyterhub or configurable-http-proxy is a failure, not a skip: ``dev/test`` installs
both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[2]
CHP = REPO / ".venv" / "chp" / "node_modules" / ".bin" / "configurable-http-proxy"
CRUCIBLE = Path(sys.executable).with_name("crucible")
SINGLEUSER = Path(sys.executable).with_name("jupyterhub-singleuser")
STARTUP_GUARD = 90  # seconds a process may take to answer before the fixture gives up
GUARD_SECONDS = 120  # seconds a polling loop may wait before a test fails (not a timing check)
GRACE = 8  # shutdown grace period of the tests' own services (a setting, not a measured bound)
USERS = ("alice", "bob", "admin", "carol", "hubwide", "fuzz", "embedded")
#: carol's server forwards to a service the fault tests start, kill and restart themselves
#: (on ``Hub.spare_port``), not to the hub-managed one. hubwide holds the unfiltered
#: ``access:services`` scope (every service of the hub, as JupyterHub's admin role does).
#: fuzz is schemathesis's user (its many queued cells hold up nobody else's).


def wait_for(url: str, proc: subprocess.Popen, log: Path, ok: int = 200) -> None:
    """Poll ``url`` until it answers ``ok``; fail with the process log if it dies or never does."""
    deadline = time.monotonic() + STARTUP_GUARD
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            last = requests.get(url, timeout=5)
            if last.status_code == ok:
                return
        except requests.RequestException as e:
            last = e
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer {ok} (last: {last}):\n{log.read_text()[-6000:]}")


def ws_refusal(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    """``(status, JSON body)`` of a WebSocket handshake at ``url`` (http://) that the server
    is expected to refuse before the upgrade (a plain request: nothing is left open)."""
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    r = requests.get(url, headers={**handshake, **headers}, timeout=60)
    assert r.status_code != 101, f"{url} upgraded"
    return r.status_code, r.json()


async def close_ws(conn: Any) -> None:
    """Close a tornado WebSocket client and its socket (a test's event loop ends with it; a
    socket left open would be reported as leaked by a later test)."""
    stream = getattr(conn.protocol, "stream", None)
    if conn.close_code is None:  # still open: close it and wait for the server's close
        conn.close()
        with contextlib.suppress(asyncio.TimeoutError):
            while await asyncio.wait_for(conn.read_message(), 30) is not None:
                pass
    conn.close()
    if stream is not None:
        stream.close()
    conn.tcp_client.close()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop ``proc`` (its process group) and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@dataclass
class Hub:
    """The running hub: its public URL, the crucible service's URL through the proxy, tokens."""

    url: str
    api_url: str
    service_url: str
    tokens: dict[str, str] = field(default_factory=dict)
    db_url: str = ""
    hub_api_direct: str = ""
    control_token: str = ""
    dir: Path = Path()
    spare_port: int = 0
    proc: subprocess.Popen | None = None

    def headers(self, who: str | None) -> dict[str, str]:
        """Authorization headers of ``who`` (a key of ``tokens``), none for None."""
        return {"Authorization": f"token {self.tokens[who]}"} if who else {}

    def call(
        self, who: str | None, method: str, path: str, *, base: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        """``(status, JSON body or text)`` of ``method path`` under the service's API."""
        url = f"{base or self.service_url}api/{path}"
        r = requests.request(method, url, headers=self.headers(who), timeout=60, **kw)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text


class Service:
    """A ``crucible serve`` process of a test's own (an external hub service: tokens checked
    by the session's real hub), on SQLite in ``tmp``; ``port`` and ``db_url`` let a test
    start it again where it was."""

    def __init__(
        self,
        tmp: Path,
        hub_api: str,
        *extra: str,
        port: int | None = None,
        db_url: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/services/crucible/"
        self.db_url = db_url or f"sqlite:///{tmp}/service.db"
        self.log = tmp / f"service-{self.port}.log"
        env = {
            **os.environ,
            "JUPYTERHUB_API_URL": hub_api,
            "JUPYTERHUB_SERVICE_NAME": "crucible",
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{self.port}",
            "CRUCIBLE_DB_URL": self.db_url,
            "CRUCIBLE_SHUTDOWN_GRACE_SECONDS": str(GRACE),
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(CRUCIBLE), "serve", "--CrucibleDispatcher.enabled_backends=local", *extra],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(f"{self.url}readyz", self.proc, self.log)

    def call(self, hub: Hub, who: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """``hub.call`` against this service directly."""
        return hub.call(who, method, path, base=self.url, **kw)


class UserServer:
    """A user's server as the hub started it, reached through the hub's proxy."""

    def __init__(self, hub: Hub, user: str) -> None:
        self.hub = hub
        self.user = user
        self.base = f"{hub.url}/user/{user}/"
        self.api = f"{self.base}crucible/api/"

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        """``(status, JSON body or text, response)`` of ``method path`` under its crucible API."""
        r = requests.request(
            method, self.api + path, headers=self.hub.headers(self.user), timeout=60, **kw
        )
        try:
            return r.status_code, r.json(), r
        except ValueError:
            return r.status_code, r.text, r


@contextlib.contextmanager
def user_server(hub: Hub, user: str) -> Iterator[UserServer]:
    """``user``'s server, started through the hub's API, stopped afterwards."""
    control = {"Authorization": f"token {hub.control_token}"}
    r = requests.post(f"{hub.api_url}/users/{user}/server", headers=control, timeout=60)
    assert r.status_code in (201, 202), r.text
    server = UserServer(hub, user)
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        r = requests.get(
            f"{server.base}api/status",
            headers=hub.headers(user),
            allow_redirects=False,
            timeout=30,
        )
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, (r.status_code, r.text[:2000])
        time.sleep(0.2)
    try:
        yield server
    finally:
        requests.delete(f"{hub.api_url}/users/{user}/server", headers=control, timeout=60)
        deadline = time.monotonic() + GUARD_SECONDS
        while time.monotonic() < deadline:  # stopped, so it can be started again
            r = requests.get(f"{hub.api_url}/users/{user}", headers=control, timeout=30)
            if not r.json().get("servers"):
                break
            time.sleep(0.2)


class Kernel:
    """A kernel of a user's server, driven over the server's kernel WebSocket through the
    hub's proxy, as JupyterLab drives it (JSON messages on ``api/kernels/{id}/channels``)."""

    def __init__(self, server: UserServer, name: str) -> None:
        self.server = server
        self.name = name
        self.id = ""
        self.session = uuid.uuid4().hex
        self.conn: Any = None

    async def __aenter__(self) -> Kernel:
        hub = self.server.hub
        r = requests.post(
            f"{self.server.base}api/kernels",
            json={"name": self.name},
            headers=hub.headers(self.server.user),
            timeout=60,
        )
        assert r.status_code == 201, r.text
        self.id = r.json()["id"]
        url = f"{self.server.base}api/kernels/{self.id}/channels?session_id={self.session}"
        request = HTTPRequest(
            url.replace("http://", "ws://", 1), headers=hub.headers(self.server.user)
        )
        self.conn = await websocket_connect(request)
        while True:  # ready once it answers kernel_info
            msg_id = self.send("kernel_info_request", {})
            try:
                reply = await self.reply(msg_id, guard=5)
            except asyncio.TimeoutError:
                continue
            if reply["msg_type"] == "kernel_info_reply":
                return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.conn is not None:
            await close_ws(self.conn)
        requests.delete(
            f"{self.server.base}api/kernels/{self.id}",
            headers=self.server.hub.headers(self.server.user),
            timeout=60,
        )

    def send(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        """Send a message; its msg_id."""
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session,
            "username": self.server.user,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": "5.3",
        }
        message = {
            "header": header,
            "parent_header": {},
            "metadata": {},
            "content": content,
            "channel": channel,
            "buffers": [],
        }
        self.conn.write_message(json.dumps(message))
        return msg_id

    async def message(self, msg_id: str, guard: float = GUARD_SECONDS) -> dict[str, Any]:
        """The next message answering ``msg_id`` (any channel)."""
        while True:
            raw = await asyncio.wait_for(self.conn.read_message(), guard)
            assert raw is not None, "the kernel's WebSocket closed"
            if isinstance(raw, bytes):
                continue  # binary protocol frames: not asked for
            message = json.loads(raw)
            if message.get("parent_header", {}).get("msg_id") == msg_id:
                return message

    async def reply(self, msg_id: str, guard: float = GUARD_SECONDS) -> dict[str, Any]:
        """The shell reply to ``msg_id``."""
        while True:
            message = await self.message(msg_id, guard)
            if message["channel"] == "shell":
                return message

    def execute(self, code: str) -> str:
        """Send an execute_request; its msg_id."""
        content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
        return self.send("execute_request", {**content, "user_expressions": {}})

    async def finish(
        self, msg_id: str, outputs: list[dict[str, Any]] | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(execute_reply content, IOPub messages)`` of ``msg_id``, once the kernel is idle."""
        outputs = [] if outputs is None else outputs
        reply, idle = None, False
        while reply is None or not idle:
            message = await self.message(msg_id)
            if message["channel"] == "shell":
                reply = message["content"]
            elif message["msg_type"] == "status":
                idle = message["content"]["execution_state"] == "idle"
            elif message["channel"] == "iopub":
                outputs.append(message)
        return reply, outputs

    async def run(self, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Execute ``code``; ``(execute_reply content, IOPub messages)``."""
        return await self.finish(self.execute(code))


def text_of(outputs: list[dict[str, Any]]) -> str:
    """Everything a cell showed: streams, errors, displays (text/plain)."""
    parts = []
    for m in outputs:
        content = m["content"]
        if m["msg_type"] == "stream":
            parts.append(content["text"])
        elif m["msg_type"] == "error":
            parts.append(f"{content['ename']}: {content['evalue']}")
        elif m["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            parts.append(content["data"].get("text/plain", ""))
    return "\n".join(parts)


#: Settings of the hub-managed service in the tests (4 cells at once, 1 per user).
SERVICE_ARGS = (
    "--CrucibleDispatcher.max_concurrency=4",
    "--CrucibleDispatcher.max_concurrency_per_user=1",
)


def _hub_config(
    tmp: Path, ports: dict[str, int], control_token: str, service_args: tuple[str, ...]
) -> str:
    service_url = f"http://127.0.0.1:{ports['service']}"
    env = {
        "CRUCIBLE_DB_URL": f"sqlite:///{tmp}/crucible.db",
        "CRUCIBLE_SHUTDOWN_GRACE_SECONDS": "5",
        "HOME": str(tmp),
    }
    command = [
        str(CRUCIBLE),
        "serve",
        *service_args,
        "--CrucibleDispatcher.enabled_backends=local",
    ]
    return f"""
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{ports["public"]}"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:{ports["hub"]}"
c.JupyterHub.db_url = "sqlite:///{tmp}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{tmp}/cookie_secret"
c.JupyterHub.pid_file = "{tmp}/jupyterhub.pid"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports["proxy_api"]}"
c.ConfigurableHTTPProxy.command = [{str(CHP)!r}]
c.ConfigurableHTTPProxy.pid_file = "{tmp}/proxy.pid"

# user servers (tests/hub/test_remote_mode.py): local processes, crucible in remote mode
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{tmp}/home/{{username}}"
c.Spawner.cmd = [{str(SINGLEUSER)!r}]
c.Spawner.args = ["--allow-root"]
c.Spawner.start_timeout = {STARTUP_GUARD}
c.Spawner.http_timeout = {STARTUP_GUARD}

def _crucible_url(spawner):
    if spawner.user.name == "embedded":  # no service: the server embeds a dispatcher
        return ""
    port = {ports["spare"]} if spawner.user.name == "carol" else {ports["service"]}
    return f"http://127.0.0.1:{{port}}/services/crucible/"


c.Spawner.environment = {{"CRUCIBLE_SERVICE_URL": _crucible_url}}
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    "access:services!service=crucible",
]

# --- crucible: the snippet of the README's JupyterHub section ---
c.JupyterHub.services = [
    {{
        "name": "crucible",
        "url": {service_url!r},
        "command": {json.dumps(command)},
        "environment": {json.dumps(env)},
        "display": False,
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": ["custom:crucible:admin"],
    }},
    {{"name": "test-control", "api_token": {control_token!r}}},
]
c.JupyterHub.custom_scopes = {{
    "custom:crucible:admin": {{
        "description": "See and cancel every user's crucible executions",
    }},
}}
c.JupyterHub.load_roles = [
    {{"name": "user", "scopes": ["self", "access:services!service=crucible"]}},
    {{"name": "crucible-admin", "scopes": ["custom:crucible:admin"], "users": ["admin"]}},
    {{"name": "every-service", "scopes": ["access:services"], "users": ["hubwide"]}},
    {{
        "name": "test-control",
        "scopes": ["admin:users", "admin:servers", "tokens"],
        "services": ["test-control"],
    }},
]
"""


def _make_tokens(hub: Hub, control_token: str) -> None:
    control = {"Authorization": f"token {control_token}"}
    r = requests.post(
        f"{hub.api_url}/users", json={"usernames": list(USERS)}, headers=control, timeout=30
    )
    assert r.status_code in (201, 409), r.text
    for user in USERS:
        r = requests.post(
            f"{hub.api_url}/users/{user}/tokens",
            json={"note": "crucible tests"},
            headers=control,
            timeout=30,
        )
        assert r.status_code == 201, r.text
        hub.tokens[user] = r.json()["token"]
    # a real token of alice's that does not carry the service's access scope
    r = requests.post(
        f"{hub.api_url}/users/alice/tokens",
        json={"note": "no crucible access", "scopes": ["read:users:name!user"]},
        headers=control,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    hub.tokens["alice-noscope"] = r.json()["token"]
    # hubwide's token for another service only
    r = requests.post(
        f"{hub.api_url}/users/hubwide/tokens",
        json={"note": "another service", "scopes": ["access:services!service=test-control"]},
        headers=control,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    hub.tokens["hubwide-other"] = r.json()["token"]


@contextlib.contextmanager
def start_hub(tmp: Path, service_args: tuple[str, ...] = SERVICE_ARGS) -> Iterator[Hub]:
    """A running JupyterHub with the crucible service (run with ``service_args``) in ``tmp``,
    its users and tokens made; stopped on exit. Also used by benchmarks/bench_hub.py."""
    if not CHP.exists():
        pytest.fail(f"configurable-http-proxy not found at {CHP}: run dev/setup --tests")
    if not CRUCIBLE.exists():
        pytest.fail(f"the crucible command is not at {CRUCIBLE}: run dev/setup --tests")
    ports = {name: free_port() for name in ("public", "hub", "proxy_api", "service", "spare")}
    control_token = secrets.token_hex(16)
    config = _hub_config(tmp, ports, control_token, service_args)
    (tmp / "jupyterhub_config.py").write_text(config)
    log = tmp / "jupyterhub.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(tmp / "jupyterhub_config.py")],
            cwd=tmp,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": f"{CHP.parent}:{os.environ.get('PATH', '')}"},
        )
    public = f"http://127.0.0.1:{ports['public']}"
    hub = Hub(
        url=public,
        api_url=f"{public}/hub/api",
        service_url=f"{public}/services/crucible/",
        db_url=f"sqlite:///{tmp}/crucible.db",
        dir=tmp,
        proc=proc,
    )
    hub.hub_api_direct = f"http://127.0.0.1:{ports['hub']}/hub/api"
    hub.spare_port = ports["spare"]
    try:
        wait_for(f"{hub.api_url}/", proc, log)
        wait_for(f"{hub.service_url}readyz", proc, log)
        hub.control_token = control_token
        _make_tokens(hub, control_token)
        yield hub
    finally:
        stop_process(proc)
        if os.environ.get("CRUCIBLE_HUB_LOG"):
            print(log.read_text()[-20000:])


#: Headers of a browser asking for a page.
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def hub_login(hub: Hub, user: str) -> requests.Session:
    """A session logged in to the hub as ``user`` through its login form (dummy auth)."""
    browser = requests.Session()
    page = browser.get(f"{hub.url}/hub/login", timeout=60)
    assert page.status_code == 200, page.text[:500]
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    form = {"username": user, "password": "any", **({"_xsrf": xsrf.group(1)} if xsrf else {})}
    # not following the hub's redirect after login: that would spawn the user's server
    r = browser.post(f"{hub.url}/hub/login", data=form, allow_redirects=False, timeout=60)
    assert r.status_code == 302, r.text[:500]
    assert any(c.name.startswith("jupyterhub-hub-login") for c in browser.cookies), r.url
    return browser
