"""The "Python (Crucible isolated)" kernel: jupyter_kernel_test's checks, and a run through a
real Jupyter server (records, statelessness, interrupt → cancelled).

Checks of jupyter_kernel_test that do not apply to a stateless kernel, and why:

- ``test_pager`` (``code_page_something``): paging help (``obj?``) needs a live object in the
  kernel; this kernel has no state, every cell runs elsewhere.
- ``test_history`` (``code_history_pattern``): there is no kernel-side history; the record of
  every cell is the crucible history (``%crucible history`` / GET executions).
- ``test_inspect`` (``code_inspect_sample``): inspection needs live objects, as for the pager.
- ``IopubWelcomeTests``: an ipykernel feature (JEP 65) independent of this kernel.

The kernel runs with its embedded dispatcher here (no Jupyter server around it) on SQLite in a
temporary directory, and without its status line (``CRUCIBLE_KERNEL_STATUS_LINE=0``), because
``test_error`` requires the error to be the only output of the cell.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jupyter_kernel_test as jkt
import pytest
from jupyter_client.kernelspec import KernelSpecManager

from tests.helpers.jupyter import ServerProcess, collect, connect, server_request, start_session

pytestmark = pytest.mark.slow


class TestCrucibleKernel(jkt.KernelTests):
    """jupyter_kernel_test against the installed ``crucible`` kernelspec."""

    kernel_name = "crucible"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys\nprint('careful', file=sys.stderr)"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result = [
        {"code": "6 * 7", "result": "42"},
        {"code": "'a' + 'b'", "result": "'ab'"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display\ndisplay(HTML('<b>hi</b>'))",
            "mime": "text/html",
        },
        {"code": "from IPython.display import display\ndisplay('plain')", "mime": "text/plain"},
    ]
    code_clear_output = "from IPython.display import clear_output\nprint('x')\nclear_output()"
    completion_samples = [
        {"text": "whil", "matches": {"while"}},
        {"text": "import zipi", "matches": {"zipimport"}},
    ]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n    return x * 2\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n    x * 2", "for i in range(3):"]
    invalid_code_samples = ["import = 7q", "1 +* 2"]

    _saved_env: dict[str, str | None]
    _tmp: tempfile.TemporaryDirectory

    @classmethod
    def setUpClass(cls) -> None:
        cls._tmp = tempfile.TemporaryDirectory()
        values = {
            "CRUCIBLE_DB_URL": f"sqlite:///{cls._tmp.name}/kernel.db",
            "CRUCIBLE_KERNEL_STATUS_LINE": "0",
        }
        cls._saved_env = {k: os.environ.get(k) for k in [*values, "CRUCIBLE_SERVER_URL"]}
        os.environ.update(values)
        os.environ.pop("CRUCIBLE_SERVER_URL", None)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        for key, value in cls._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        cls._tmp.cleanup()

    def test_kernel_info_banner_says_stateless(self) -> None:
        self.flush_channels()
        msg_id = self.kc.kernel_info()
        reply = self.kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=30)
        content = reply["content"]
        assert content["implementation"] == "crucible"
        assert "no variables, imports or files carry over" in content["banner"]

    def test_no_state_between_cells(self) -> None:
        self.flush_channels()
        reply, _ = self.execute_helper("x = 41")
        assert reply["content"]["status"] == "ok"
        reply, outputs = self.execute_helper("x + 1")
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "NameError"
        assert [m["msg_type"] for m in outputs] == ["error"]

    def test_cell_options_line(self) -> None:
        self.flush_channels()
        reply, outputs = self.execute_helper("%%crucible --timeout 1\nimport time\ntime.sleep(30)")
        assert reply["content"]["status"] == "error"
        assert reply["content"]["evalue"].startswith("timed out after 1 s (crucible execution")

    def _outputs(self, code: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        self.flush_channels()
        reply, outputs = self.execute_helper(code)
        return reply["content"], outputs

    def test_ipython_syntax_is_refused_with_a_reason(self) -> None:
        for code in ("%magics", "!ls", "files = !ls", "print?", "%%time\nprint(1)"):
            content, outputs = self._outputs(code)
            assert content["status"] == "error", code
            assert content["ename"] == "UsageError"
            assert "IPython syntax" in content["evalue"]
            assert "fresh" in content["evalue"]
            assert [m["msg_type"] for m in outputs] == ["error"]

    def test_crucible_line_commands_work_in_the_kernel(self) -> None:
        content, _ = self._outputs("print('recorded')")
        assert content["status"] == "ok"
        content, outputs = self._outputs("%crucible history -n 1")
        assert content["status"] == "ok", content
        [result] = [m for m in outputs if m["msg_type"] == "execute_result"]
        assert result["content"]["execution_count"] == content["execution_count"]
        table = result["content"]["data"]["text/plain"]
        execution_id = table.splitlines()[1].split()[0]
        assert "succeeded" in table
        content, outputs = self._outputs(f"%crucible status {execution_id}")
        [result] = [m for m in outputs if m["msg_type"] == "execute_result"]
        assert f"execution {execution_id}: succeeded" in result["content"]["data"]["text/plain"]
        content, outputs = self._outputs("%crucible queue")
        [result] = [m for m in outputs if m["msg_type"] == "execute_result"]
        assert result["content"]["data"]["text/plain"].startswith("queue: ")
        content, _ = self._outputs("%crucible status no-such-id")
        assert content["ename"] == "UsageError"
        assert "no execution with id 'no-such-id'" in content["evalue"]

    def test_bad_options_are_one_usage_error_and_nothing_runs(self) -> None:
        for code, says in [
            ('%%crucible --name "open\nprint(1)', "no closing quotation"),
            ("%%crucible --timeout 1 --timeout 2\nprint(1)", "given more than once"),
            ("%%crucible --priority urgent\nprint(1)", "invalid choice: 'urgent'"),
            ("%%crucible --timeout 5\n  \n", "no code to run"),
            ("%%crucible --memory 12XB\nprint(1)", "unknown unit 'XB'"),
        ]:
            content, outputs = self._outputs(code)
            assert content["status"] == "error", code
            assert says in content["evalue"], content
            assert [m["msg_type"] for m in outputs] == ["error"]
        content, outputs = self._outputs('%%crucible --name "two words" --tag x\nprint(1)')
        assert content["status"] == "ok", content

    def test_cell_help_is_shown_and_nothing_runs(self) -> None:
        content, outputs = self._outputs("%%crucible --help\nprint('not run')")
        assert content["status"] == "ok", content
        [shown] = [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"]
        assert shown.startswith("%%crucible [options]")
        assert "--timeout SECONDS" in shown
        assert "not run" not in shown

    def test_display_updates_replace_in_place(self) -> None:
        content, outputs = self._outputs(
            "from IPython.display import display, update_display\n"
            "h = display('first', display_id=True)\n"
            "h.update('second')\n"
            "update_display('third', display_id=h.display_id)\n"
        )
        assert content["status"] == "ok"
        kinds = [(m["msg_type"], m["content"]["data"]["text/plain"]) for m in outputs]
        assert kinds == [
            ("display_data", "'first'"),
            ("update_display_data", "'second'"),
            ("update_display_data", "'third'"),
        ]
        ids = {m["content"]["transient"]["display_id"] for m in outputs}
        assert len(ids) == 1

    def test_input_fails_at_once_with_a_reason(self) -> None:
        content, outputs = self._outputs("name = input('name? ')")
        assert content["status"] == "error"
        assert content["ename"] == "EOFError"
        assert "input() is not available" in content["evalue"]

    def test_a_widget_comm_is_closed_with_a_reason(self) -> None:
        self.flush_channels()
        msg = self.kc.session.msg(
            "comm_open", {"comm_id": "w1", "target_name": "jupyter.widget", "data": {}}
        )
        self.kc.shell_channel.send(msg)
        while True:
            reply = self.kc.get_iopub_msg(timeout=30)
            if reply["msg_type"] == "comm_close":
                break
        assert reply["content"]["comm_id"] == "w1"
        assert "no comms" in reply["content"]["data"]["error"]


def test_kernelspec_is_installed() -> None:
    spec = KernelSpecManager().get_kernel_spec("crucible")
    assert spec.display_name == "Python (Crucible isolated)"
    assert spec.interrupt_mode == "message"
    assert spec.argv[1:3] == ["-m", "crucible_jupyter.kernel"]
    assert Path(spec.resource_dir, "logo-64x64.png").exists()


def test_kernel_through_a_real_server(jupyter_server_process: ServerProcess) -> None:
    """A notebook on the crucible kernel, opened through the server: status line, records with
    the notebook, interrupt cancels."""
    server = jupyter_server_process
    nb_path = "isolated.ipynb"
    (server.root / nb_path).write_text(
        '{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}'
    )
    kernel_id = start_session(server, nb_path, kernel="crucible")["kernel"]["id"]

    async def scenario() -> tuple[str, str]:
        kc = await connect(server, kernel_id)
        try:
            kc.cell_id = "cell-one"
            msgs = await collect(kc, kc.execute("print('isolated')\n6 * 7"))
            kinds = [m["msg_type"] for m in msgs]
            assert "stream" in kinds
            assert "execute_result" in kinds
            status = [
                m["content"]["data"]["text/plain"]
                for m in msgs
                if m["msg_type"] in ("display_data", "update_display_data")
            ]
            assert "succeeded" in status[-1]
            first_id = status[-1].rsplit(" · ", 1)[-1]

            # an id is looked up as typed: not cut at a "?", not refused for a space
            for line in (f"%crucible status '{first_id}?x'", "%crucible status 'a b'"):
                msgs = await collect(kc, kc.execute(line))
                [error] = [m["content"] for m in msgs if m["msg_type"] == "error"]
                assert "no execution with id" in error["evalue"], error

            kc.cell_id = "cell-two"
            interrupted: list[float] = []

            async def interrupt_once(msg: dict[str, Any]) -> None:
                if msg["msg_type"] == "stream" and not interrupted:
                    interrupted.append(time.time())
                    code = server_request(server, "POST", f"api/kernels/{kernel_id}/interrupt")
                    assert code == 204

            msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
            msgs = await collect(kc, msg_id, interrupt_once)
            errors = [m for m in msgs if m["msg_type"] == "error"]
            assert errors
            assert errors[0]["content"]["ename"] == "KeyboardInterrupt"
            assert time.time() - interrupted[0] < 20
            status = [
                m["content"]["data"]["text/plain"]
                for m in msgs
                if m["msg_type"] in ("display_data", "update_display_data")
            ]
            return first_id, status[-1].rsplit(" · ", 1)[-1]
        finally:
            kc.stop_channels()

    first_id, second_id = asyncio.run(scenario())
    first = server.api("GET", f"executions/{first_id}")
    assert first["status"] == "succeeded"
    assert first["notebook"] == {"path": nb_path, "cell_id": "cell-one", "kernel_id": kernel_id}
    second = server.api("GET", f"executions/{second_id}")
    assert second["status"] == "cancelled"


def test_kernel_example_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/crucible-kernel.ipynb on the crucible kernel (embedded dispatcher), via nbclient."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CRUCIBLE_DB_URL", f"sqlite:///{tmp_path}/k.db")
    monkeypatch.delenv("CRUCIBLE_SERVER_URL", raising=False)
    repo = Path(__file__).resolve().parents[2]
    nb = nbformat.read(repo / "examples" / "crucible-kernel.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="crucible").execute()
    texts = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells[1:]]
    assert "as uid 65534" in texts[0]  # the sandbox user, not ours
    assert texts[1] == "tick 0\ntick 1\ntick 2\n"
    results = [o for o in nb.cells[2].outputs if o["output_type"] == "execute_result"]
    assert results[0]["data"]["text/plain"] == "45"
    assert "is not defined here" in texts[2]
    status = [
        o["data"]["text/plain"] for o in nb.cells[2].outputs if o["output_type"] == "display_data"
    ]
    assert "succeeded" in status[0]


def test_run_all_stops_at_the_failing_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nbclient's "Run all" on the crucible kernel: the failing cell's error carries ename,
    evalue and the remote traceback (pointing at the cell's own line); later cells never run."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("CRUCIBLE_DB_URL", f"sqlite:///{tmp_path}/k.db")
    monkeypatch.delenv("CRUCIBLE_SERVER_URL", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print('first')"),
        nbformat.v4.new_code_cell("x = 1\nraise ValueError('bad ünïcode 💥')"),
        nbformat.v4.new_code_cell("print('never')"),
    ]
    with pytest.raises(CellExecutionError) as e:
        NotebookClient(nb, timeout=120, kernel_name="crucible").execute()
    assert e.value.ename == "ValueError"
    assert e.value.evalue == "bad ünïcode 💥"
    [error] = [o for o in nb.cells[1].outputs if o["output_type"] == "error"]
    tb = "\n".join(error["traceback"])
    assert 'File "<cell>", line 2' in tb
    assert "raise ValueError" in tb
    assert nb.cells[0].execution_count == 1
    assert nb.cells[1].execution_count == 2
    assert nb.cells[2].outputs == []
    assert nb.cells[2].execution_count is None


def test_status_line_survives_clear_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that clears its output (a ``clear_output(wait=True)`` animation) still ends with
    the status line saying how it ended, next to its last frame."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CRUCIBLE_DB_URL", f"sqlite:///{tmp_path}/k.db")
    monkeypatch.delenv("CRUCIBLE_SERVER_URL", raising=False)
    monkeypatch.delenv("CRUCIBLE_KERNEL_STATUS_LINE", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from IPython.display import clear_output\n"
            "for i in range(3):\n"
            "    clear_output(wait=True)\n"
            "    print('frame', i)\n"
        ),
        nbformat.v4.new_code_cell("from IPython.display import clear_output\nclear_output()"),
    ]
    NotebookClient(nb, timeout=120, kernel_name="crucible").execute()
    for cell, text in zip(nb.cells, ["frame 2\n", ""], strict=True):
        streams = "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")
        assert streams == text
        [status] = [o["data"]["text/plain"] for o in cell.outputs if "data" in o]
        assert "✔ succeeded" in status, cell.outputs
