"""The ``crucible`` command: run a cell, look at history, cancel, check the machine.

Every subcommand uses an embedded :class:`~crucible_jupyter.dispatcher.Dispatcher` on the
same database as the Jupyter server (SQLite in the Jupyter data dir unless
``--db-url``/``CRUCIBLE_DB_URL`` says otherwise), so what the CLI runs shows up in the
server's history and the other way round. Settings come from ``crucible_config.py`` (or
``.json``) in the Jupyter config path, as ``c.CrucibleDispatcher...`` and
``c.CrucibleLocalBackend...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from datetime import datetime
from typing import Any

from .config_files import load_config
from .errors import CrucibleError
from .models import Event, Execution, Status, format_bytes
from .protocol import ENV_CLI_TIMING, ENV_SERVICE_URL, env_flag, env_text, local_user
from .terminal import Output, dumps, escape

EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 130
#: 128 + SIGPIPE: how a shell reports a command whose output pipe was closed
EXIT_BROKEN_PIPE = 128 + int(signal.SIGPIPE)
_TONES = {"succeeded": "ok", "failed": "bad", "timed_out": "bad", "cancelled": "bad"}


def make_dispatcher(args: argparse.Namespace):
    """A dispatcher configured from files, env and the command line."""
    from .dispatcher import Dispatcher

    return Dispatcher(config=load_config(args.db_url))


@contextlib.asynccontextmanager
async def read_only_dispatcher(args: argparse.Namespace):
    """A started dispatcher that reads and cancels but schedules nothing (and touches
    nothing another process left), stopped on exit."""
    dispatcher = make_dispatcher(args)
    await dispatcher.start(schedule=False)
    try:
        yield dispatcher
    finally:
        await dispatcher.stop()


def exit_code_for(execution: Execution) -> int:
    """The shell exit status mirroring an execution's outcome."""
    if execution.status is Status.SUCCEEDED:
        return 0
    if execution.status is Status.TIMED_OUT:
        return EXIT_TIMED_OUT
    if execution.status is Status.CANCELLED:
        return EXIT_CANCELLED
    code = execution.exit_code
    return code if code and 0 < code < 256 else 1


def render(event: Event, output: Output, quiet: bool = False) -> None:
    """Show one event the way a terminal user expects (``output`` escapes what a cell wrote
    where it reaches a terminal, and styles crucible's own lines there)."""
    d = event.data
    if event.type == "stream":
        name = "stderr" if d.get("name") == "stderr" else "stdout"
        output.cell(name, str(d.get("text", "")), keep_cr=True)
    elif event.type in ("display_data", "execute_result"):
        data = d.get("data", {})
        text = data.get("text/plain")
        others = [str(k) for k in data if k != "text/plain"]
        if text is not None:
            output.cell("stdout", str(text) + "\n")
        if others and not quiet:
            output.line(f"rich output ({', '.join(others)}): open it in Jupyter to view")
    elif event.type == "error":
        lines = d.get("traceback") or [f"{d.get('ename')}: {d.get('evalue')}"]
        output.cell("stderr", "\n".join(str(line) for line in lines) + "\n")
    elif event.type == "status" and not quiet:
        status = d.get("status")
        extra = ""
        if status == "queued" and d.get("position"):
            extra = f" (position {d['position']})"
        elif d.get("reason"):
            extra = f": {d['reason']}"
        if d.get("duration_ms") is not None:
            extra += f" in {d['duration_ms'] / 1000:.2f} s"
        output.line(f"{status}{extra}", tone=_TONES.get(str(status)))


async def cmd_run(args: argparse.Namespace) -> int:
    """Run one cell from a file (or stdin), streaming its output; exit like the cell."""
    if args.file == "-":
        code = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:  # noqa: ASYNC230 - one small file
                code = f.read()
        except (OSError, UnicodeDecodeError) as e:
            print(f"crucible: cannot read {args.file}: {e}", file=sys.stderr)
            return 2
    request: dict[str, Any] = {"code": code, "priority": args.priority, "tags": args.tag or []}
    for key in ("timeout", "cpu", "memory", "name", "backend", "image"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    env = {}
    for item in args.env or []:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"crucible: --env takes NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        env[name] = value
    request["env"] = env
    # written from a thread, never blocking this loop (it enforces the timeout): a reader
    # that does not keep up loses output, and is told so, instead of stalling the run
    output = Output(background=True)
    dispatcher = make_dispatcher(args)
    await dispatcher.start()
    try:
        execution = await dispatcher.submit(request, user=local_user())
        output.hint = execution.id
        if not args.quiet and not args.json:
            output.line(f"execution {execution.id}")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def follow() -> None:
            async for event in dispatcher.subscribe(execution.id):
                if args.json:
                    output.json(dumps(event.to_dict()))
                else:
                    render(event, output, quiet=args.quiet)

        follower = asyncio.create_task(follow())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([follower, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not follower.done():
            output.line("cancelling…")
            with contextlib.suppress(CrucibleError):
                await dispatcher.cancel(execution.id)
            await follower
        stopper.cancel()
        final = await dispatcher.wait(execution.id)
        if final.isolation == "none" and not args.quiet:
            output.line(
                "WARNING: this cell ran WITHOUT isolation; see `crucible doctor`", tone="bad"
            )
        return exit_code_for(final)
    finally:
        try:
            await dispatcher.stop()
        finally:  # the run is over and recorded: what is left only waits for the reader
            await asyncio.to_thread(output.close)


def _short(text: str, width: int) -> str:
    """The first non-blank line of ``text`` in at most ``width`` characters, with control
    characters shown escaped (a cell's code must not drive the reader's terminal)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = escape(line)
    return line if len(line) <= width else line[: width - 1] + "…"


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


async def cmd_history(args: argparse.Namespace) -> int:
    """List recorded executions, newest first."""
    async with read_only_dispatcher(args) as dispatcher:
        page, cursor = await dispatcher.list(
            user=args.user, status=args.status, tag=args.tag, limit=args.limit, cursor=args.cursor
        )
    if args.json:
        print(dumps({"executions": [e.to_dict() for e in page], "next_cursor": cursor}))
        return 0
    print(f"{'ID':36}  {'STATUS':9}  {'CREATED':19}  {'TIME':>8}  CODE")
    for e in page:
        dur = f"{e.duration_ms / 1000:.2f}s" if e.duration_ms is not None else "-"
        print(
            f"{e.id:36}  {e.status.value:9}  {_when(e.created_at):19}  {dur:>8}  "
            f"{_short(e.request.name or e.request.code, 40)}"
        )
    if cursor:
        print(f"(more: crucible history --cursor {cursor})")
    return 0


async def cmd_show(args: argparse.Namespace) -> int:
    """Show one execution: its record and its output."""
    async with read_only_dispatcher(args) as dispatcher:
        execution = await dispatcher.get(args.id)
        events = await dispatcher.events(args.id)
    if args.json:
        print(dumps({**execution.to_dict(), "events": [e.to_dict() for e in events]}))
        return 0
    output = Output()
    d = execution.to_dict()
    for key in ("id", "status", "reason", "exit_code", "user", "backend", "isolation"):
        if d.get(key) is not None:
            output.text(f"{key + ':':12} {d[key]}\n")
    output.text(f"{'created:':12} {_when(execution.created_at)}\n")
    if execution.duration_ms is not None:
        output.text(f"{'duration:':12} {execution.duration_ms / 1000:.3f} s\n")
    output.text(
        f"{'output:':12} {format_bytes(execution.output_bytes)}"
        + (
            f" (truncated, {format_bytes(execution.dropped_bytes)} dropped)"
            if execution.truncated
            else ""
        )
        + "\n"
    )
    output.text("--- code ---\n")
    output.text(execution.request.code.rstrip("\n") + "\n")
    output.text("--- output ---\n")
    for event in events:
        if event.type != "status":
            render(event, output, quiet=True)
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a queued or running execution, wherever it runs on this machine."""
    async with read_only_dispatcher(args) as dispatcher:
        execution = await dispatcher.cancel(args.id)
    print(
        f"{execution.id}: {execution.status.value}"
        + (f" ({escape(execution.reason)})" if execution.reason else "")
    )
    return 0 if execution.status.terminal else 1


async def cmd_doctor(args: argparse.Namespace) -> int:
    """Say which isolation is available and, if not, why and how to get it. In a user
    server in remote mode (CRUCIBLE_SERVICE_URL set): whether the service answers and
    whether this server's token may use it."""
    service_url = env_text(ENV_SERVICE_URL, "")
    if service_url and not args.backend:
        from .service.check import doctor

        return await doctor(service_url, args.json)
    dispatcher = make_dispatcher(args)
    checks = []
    try:
        await dispatcher.start(schedule=False)
        checks.append({"name": "storage", "ok": True, "detail": str(dispatcher.storage)})
        backend = dispatcher.get_backend(args.backend or dispatcher.backend)
        checks += [c.to_dict() for c in await backend.checks()]
        isolation = getattr(backend, "isolation", backend.name)
    except CrucibleError as e:
        checks.append({"name": "dispatcher", "ok": False, "detail": e.message})
        isolation = "unknown"
    finally:
        await dispatcher.stop()
    failed = [c for c in checks if not c["ok"] and c.get("severity", "error") == "error"]
    if args.json:
        print(json.dumps({"isolation": isolation, "checks": checks, "ok": not failed}))
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else ("WARN" if c.get("severity") == "warning" else "FAIL")
            print(f"[{mark}] {c['name']}: {c['detail']}")
            if not c["ok"] and c.get("fix"):
                print(f"       fix: {c['fix']}")
        print(f"isolation: {isolation}")
    return 1 if failed else 0


async def cmd_serve(args: argparse.Namespace) -> int:
    """Run the standalone service (``crucible_jupyter.service``) until SIGTERM."""
    from .service import run as run_service

    argv = list(args.options)
    if args.db_url:
        argv.append(f"--CrucibleDispatcher.db_url={args.db_url}")
    return await run_service(argv)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``crucible`` command."""
    parser = argparse.ArgumentParser(
        prog="crucible", description="Run notebook cells as isolated, recorded executions."
    )
    parser.add_argument("--db-url", help="database URL (default: CRUCIBLE_DB_URL or SQLite)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a cell from FILE (or - for stdin), streaming output")
    run.add_argument("file", help="file with the cell's code, or - to read stdin")
    run.add_argument("--timeout", type=float, help="seconds before the cell is killed")
    run.add_argument("--priority", default="normal", choices=["high", "normal", "low"])
    run.add_argument("--cpu", help="CPU cores, e.g. 0.5 or 500m")
    run.add_argument("--memory", help="memory limit, e.g. 256Mi")
    run.add_argument("--tag", action="append", help="tag the execution (repeatable)")
    run.add_argument(
        "--env", action="append", metavar="NAME=VALUE", help="environment (repeatable)"
    )
    run.add_argument("--name", help="a name for the execution")
    run.add_argument("--backend", help="backend to run on (default: configured)")
    run.add_argument("--image", help="image (Kubernetes backend)")
    run.add_argument("--json", action="store_true", help="print events as JSON lines")
    run.add_argument("-q", "--quiet", action="store_true", help="print only the cell's output")
    run.set_defaults(func=cmd_run)

    hist = sub.add_parser("history", help="list recorded executions, newest first")
    hist.add_argument("--user")
    hist.add_argument("--status", choices=[s.value for s in Status])
    hist.add_argument("--tag")
    hist.add_argument(
        "-n", "--limit", type=int, default=20, metavar="N", help="at most N (default 20)"
    )
    hist.add_argument("--cursor")
    hist.add_argument("--json", action="store_true")
    hist.set_defaults(func=cmd_history)

    show = sub.add_parser("show", help="show one execution and its output")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    cancel = sub.add_parser("cancel", help="cancel a queued or running execution")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)

    doctor = sub.add_parser("doctor", help="check isolation, limits and storage")
    doctor.add_argument("--json", action="store_true")
    doctor.add_argument("--backend", help="backend to check (default: the configured one)")
    doctor.set_defaults(func=cmd_doctor)

    serve = sub.add_parser(
        "serve",
        help="serve the API for every user of a JupyterHub (a hub service; --help-all)",
        add_help=False,
        prefix_chars="\0",  # every option goes to the service's own (traitlets) parser
    )
    serve.add_argument("options", nargs="*", help="service options (crucible serve --help-all)")
    serve.set_defaults(func=cmd_serve)
    return parser


def _stdout_closed() -> int:
    """What to do once stdout's reader has gone (``crucible history | head -1``): the Python
    documentation's recipe. Nothing more is printed (the rest goes to /dev/null, so the flush
    at exit cannot fail again) and the status is the one a shell shows for a command killed by
    SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``crucible`` command."""
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        code = asyncio.run(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except CrucibleError as e:
        print(f"crucible: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    finally:
        if env_flag(ENV_CLI_TIMING, False):
            print(f"[crucible] {time.monotonic() - started:.3f} s", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
