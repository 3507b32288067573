"""Defects a newcomer met following the README, each held by a test that failed before its fix.
The commands run as real processes (``crucible``, ``jupyter``), each on a SQLite database of
its own; the cells run in the real local sandbox."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from crucible_jupyter.errors import InvalidRequest
from crucible_jupyter.models import parse_bytes
from crucible_jupyter.server.openapi import openapi_document

BIN = Path(sys.executable).parent


@pytest.fixture
def crucible(tmp_path):
    """Run ``crucible --db-url <a fresh SQLite file> ARGS`` from an empty directory."""
    url = f"sqlite:///{tmp_path}/crucible.db"

    def run(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "crucible"), "--db-url", url, *args],
            cwd=tmp_path,
            env=env,
            text=True,
            timeout=120,
            **{"capture_output": True, **kwargs},
        )

    return run


# ----- 1. `crucible history | head -1`: no traceback, the status of a closed pipe -------------


@pytest.mark.parametrize(
    "args", [["history"], ["history", "--json"], ["doctor", "--json"]], ids=" ".join
)
def test_a_closed_stdout_ends_the_command_quietly(crucible, args):
    read, write = os.pipe()
    os.close(read)  # the reader (`| head -1`) is gone before the first line is written
    try:
        done = crucible(*args, stdout=write, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write)
    assert done.stderr == ""  # was: a BrokenPipeError traceback
    assert done.returncode == 128 + signal.SIGPIPE  # was 1; what a shell shows for SIGPIPE


# ----- 2. --help-all lists crucible's classes, with no import circle on the way ---------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["crucible", "serve"], ["CrucibleService", "CrucibleDispatcher", "CrucibleLocalBackend"]),
        (["jupyter", "server"], ["CrucibleApp", "CrucibleDispatcher", "CrucibleLocalBackend"]),
        (["jupyter", "crucible"], ["CrucibleApp", "CrucibleDispatcher", "CrucibleLocalBackend"]),
    ],
    ids=["crucible serve", "jupyter server", "jupyter crucible"],
)
def test_help_all_lists_the_crucible_classes_and_no_import_error(tmp_path, command, expected):
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help-all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # was: "crucible_jupyter: settings not listed here (cannot import name 'crucible_classes'
    # from partially initialized module 'crucible_jupyter.server.app' ...)"
    assert "settings not listed here" not in done.stderr
    assert "partially initialized" not in done.stderr
    for name in expected:
        assert f"--{name}." in done.stdout, name


# ----- 3. the OpenAPI memory pattern is exactly what the server's parser takes ----------------

#: strings the parser takes (the README's and the demo's among them)
ACCEPTED = [
    "512Mi", "2Gi", "1G", "1Gi", "256Mi", "16Mi", "8Gi", "1.5Gi", "0.5Gi", "256mi", "1gi",
    "2GI", "1Ti", "3t", "16MB", "1kb", "1Ki", "1K", "7b", "100", "1048576", " 2Gi ", "512 Mi",
    "\t1Gi\n", "007Mi",
]  # fmt: skip
#: strings it refuses for their form: the pattern must refuse them too
MALFORMED = [
    "", " ", "Mi", "1Pi", "1Pib", "2 Gi B", "1 G i", "-1Gi", "+1Gi", "1e9", "1E3Mi", "1,5Gi",
    ".5Gi", "5.Gi", "1Gi1", "0x10", "1_000", "inf", "nan", "1\u2003Gi", "\uff11Gi", "1Gi\x00",
    "1\u0663Mi", "lots", "512Mi;", "1MiB", "1GiB",
]  # fmt: skip
#: strings of the right form whose size the parser refuses (no pattern can weigh a size; the
#: description names the range, as minimum/maximum do for a number)
OUT_OF_RANGE = ["0", "0Mi", "0.0Gi", "99999999999Ti"]


def _memory_string_schema() -> dict:
    doc = openapi_document("/crucible/api/")
    request = doc["components"]["schemas"]["ExecutionRequest"]["properties"]
    (schema,) = [s for s in request["memory"]["oneOf"] if s["type"] == "string"]
    assert request["resources"]["properties"]["memory"] == request["memory"]
    return schema


def _parses(value: str) -> bool:
    try:
        parse_bytes(value)
    except InvalidRequest:
        return False
    return True


def test_the_size_cases_are_what_the_parser_says():
    assert all(_parses(v) for v in ACCEPTED), [v for v in ACCEPTED if not _parses(v)]
    assert not any(_parses(v) for v in MALFORMED + OUT_OF_RANGE)


def test_the_memory_pattern_matches_what_the_parser_accepts_and_nothing_else():
    schema = _memory_string_schema()
    pattern = schema["pattern"]
    for example in ("512Mi", "2Gi", "1G"):  # the description's examples (was: only ...Mi)
        assert example in schema["description"]
    wrong = [v for v in ACCEPTED if not re.search(pattern, v)]
    wrong += [v for v in MALFORMED if re.search(pattern, v)]
    wrong += [v for v in OUT_OF_RANGE if not re.search(pattern, v)]
    assert wrong == []
    # and as a JSON Schema validator applies it
    for value in ACCEPTED:
        jsonschema.validate(value, schema)
    for value in MALFORMED:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)


@pytest.mark.skipif(shutil.which("node") is None, reason="node (an ECMA-262 engine) not found")
def test_the_memory_pattern_means_the_same_in_ecma_262():
    """OpenAPI patterns are ECMA-262 regular expressions: clients (the Lab extension, any
    generated client) apply them with JavaScript's RegExp, not Python's re."""
    pattern = _memory_string_schema()["pattern"]
    script = (
        "const [p, vs] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "console.log(JSON.stringify(vs.map(v => new RegExp(p, 'u').test(v))));"
    )
    values = ACCEPTED + MALFORMED + OUT_OF_RANGE
    done = subprocess.run(
        ["node", "-e", script],
        input=json.dumps([pattern, values]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    matched = dict(zip(values, json.loads(done.stdout), strict=True))
    assert matched == {v: v not in MALFORMED for v in values}


# ----- 4. the CLI and the server record one person under one name -----------------------------

#: the environment variables getpass.getuser() reads, and JupyterHub's
LOGIN_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME", "JUPYTERHUB_USER")


def _server_kernel_user(env: dict[str, str], cwd: Path) -> str:
    """The user the Jupyter server extension records kernels' cells as, in ``env``."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from crucible_jupyter.server.app import CrucibleApp; print(CrucibleApp().kernel_user)",
        ],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


def _recorded_user(crucible, env: dict[str, str]) -> str:
    ran = crucible("run", "-q", "-", input="print(1)", env=env)
    assert ran.returncode == 0, ran.stderr
    (record,) = json.loads(crucible("history", "--json", "--limit", "1", env=env).stdout)[
        "executions"
    ]
    return record["user"]


def test_without_USER_the_cli_records_the_os_user_as_the_server_does(crucible, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_VARIABLES}
    os_user = pwd.getpwuid(os.getuid()).pw_name
    assert _server_kernel_user(env, tmp_path) == os_user
    assert _recorded_user(crucible, env) == os_user  # was: "local"


def test_in_a_hub_user_server_the_cli_records_the_hub_user_as_the_server_does(crucible, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_VARIABLES}
    env["JUPYTERHUB_USER"] = "ada"
    assert _server_kernel_user(env, tmp_path) == "ada"
    assert _recorded_user(crucible, env) == "ada"


# ----- 5. `crucible history -n N`, as the magic's `%crucible history -n N` --------------------


def test_history_takes_n_as_the_magic_does(crucible):
    for _ in range(2):
        assert crucible("run", "-q", "-", input="print(1)").returncode == 0
    short = crucible("history", "-n", "1", "--json")
    assert short.returncode == 0, short.stderr  # was 2: "unrecognized arguments: -n 1"
    page = json.loads(short.stdout)
    assert len(page["executions"]) == 1
    assert page["next_cursor"]
    assert crucible("history", "--limit", "1", "--json").stdout == short.stdout
    table = crucible("history", "-n", "1").stdout.splitlines()
    assert len(table) == 3  # header, one execution, "(more: ...)"
