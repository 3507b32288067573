"""No runnable content leaves a sandbox, seen in a real JupyterLab (issue 12, item 1).

A ``%%crucible`` cell, then a cell of the "Python (Crucible isolated)" kernel, display script
in each form JupyterLab would run in live (trusted) output: ``<script>`` and ``<img
onerror>`` in HTML, ``<script>`` and ``onload`` in inline SVG, ``application/javascript``,
an SVG image with a script, Markdown with raw ``<script>`` and ``<img onerror>``. Each
payload, if it ran, would mark ``window``, change ``document.title``, write a file through
``PUT /api/contents`` and open a terminal through ``POST /api/terminals`` with the page's
own session. After the cells: nothing marked the page, the title is unchanged, no such file
exists, no terminal was opened, and the cell's table (a pandas DataFrame's HTML) is shown as
an HTML ``<table>``.

Without the output policy this test fails: run it with
``CRUCIBLE_TRUSTED_OUTPUT_TYPES=text/html,text/markdown,image/svg+xml,application/javascript``
(the documented way to pass those types unchanged) and the payloads run.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.lab import (
    CRUCIBLE,
    FINISHED,
    PYTHON3,
    LabPage,
    LabServer,
    finished,
    write_notebook,
)

pytestmark = pytest.mark.browser

# Builds each payload inside the cell: the page's XSRF cookie makes the requests count.
PAYLOADS = r'''
def steal(vector):
    return (
        "(window.crucibleRan = window.crucibleRan || []).push('" + vector + "');"
        "document.title = 'pwned by " + vector + "';"
        "var m = document.cookie.match(/_xsrf=([^;]+)/);"
        "var h = {'Content-Type': 'application/json'};"
        "if (m) { h['X-XSRFToken'] = decodeURIComponent(m[1]); }"
        "fetch('/api/contents/pwned-" + vector + ".txt', {method: 'PUT', headers: h,"
        " body: JSON.stringify({type: 'file', format: 'text', content: 'pwned'})});"
        "fetch('/api/terminals', {method: 'POST', headers: h});"
    )

display({"text/html": "<p>chart</p><script>" + steal(PREFIX + "html-script") + "</script>",
         "text/plain": "chart"}, raw=True)
display({"text/html": '<img src="x" onerror="' + steal(PREFIX + "html-img") + '">'}, raw=True)
display({"text/html": "<svg><script>" + steal(PREFIX + "html-svg-script") + "</script></svg>"
                      '<svg onload="' + steal(PREFIX + "html-svg-onload") + '"></svg>'},
        raw=True)
display({"application/javascript": steal(PREFIX + "js")}, raw=True)
display({"image/svg+xml": '<svg xmlns="http://www.w3.org/2000/svg" onload="'
                          + steal(PREFIX + "svg-image") + '"><script>'
                          + steal(PREFIX + "svg-image-script") + "</script></svg>"}, raw=True)
display({"text/markdown": "**md** <script>" + steal(PREFIX + "md-script") + "</script>\n\n"
                          '<img src="x" onerror="' + steal(PREFIX + "md-img") + '">'},
        raw=True)

TABLE = """<div>
<style scoped>
    .dataframe tbody tr th { vertical-align: top; }
    .dataframe thead th { text-align: right; }
</style>
<table border="1" class="dataframe">
  <thead>
    <tr style="text-align: right;"><th></th><th>city</th><th>temp</th></tr>
  </thead>
  <tbody>
    <tr><th>0</th><td>Oslo</td><td>3.5</td></tr>
    <tr><th>1</th><td>Lima</td><td>19.0</td></tr>
  </tbody>
</table>
</div>"""
display({"text/html": TABLE, "text/plain": "  city  temp\n0 Oslo   3.5\n1 Lima  19.0"}, raw=True)
'''
VECTORS = [
    *("html-script", "html-img", "html-svg-script", "html-svg-onload", "js"),
    *("svg-image", "svg-image-script", "md-script", "md-img"),
]

MAGIC_CELL = f'%%crucible --name output-policy\nPREFIX = "magic-"\n{PAYLOADS}'
KERNEL_CELL = f'PREFIX = "kernel-"\n{PAYLOADS}'

# What the page shows for one code cell: was anything run, the title, and its tables.
_PAGE_JS = """
const index = arguments[0];
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
const cell = panel.querySelectorAll('.jp-Notebook .jp-CodeCell')[index];
return {
  ran: window.crucibleRan || [],
  title: document.title,
  tables: Array.from(cell.querySelectorAll('.jp-OutputArea-output table.dataframe')).map(
    t => Array.from(t.querySelectorAll('td')).map(td => td.textContent)),
  scripts: cell.querySelectorAll('.jp-OutputArea-output script').length,
  handlers: Array.from(cell.querySelectorAll('.jp-OutputArea-output *')).filter(
    e => Array.from(e.attributes).some(a => a.name.startsWith('on'))).length,
};
"""


def _run_and_check(page: LabPage, lab: LabServer, index: int, prefix: str) -> None:
    title = page.driver.title
    page.run_cell(index)
    page.wait_cell(index, finished, "the cell to finish", timeout=90)
    cell = page.cell(index)
    icon, state, _ = FINISHED.search(cell.text).groups()
    assert state == "succeeded", cell
    shown: dict[str, Any] = page.driver.execute_script(_PAGE_JS, index)
    # the table is there, so every output before it has been rendered
    assert shown["tables"] == [["Oslo", "3.5", "Lima", "19.0"]], shown
    assert shown["ran"] == [], f"script from the cell's output ran in the page: {shown['ran']}"
    assert shown["title"] == title, shown
    assert page.driver.title == title, shown
    assert shown["scripts"] == 0, shown
    assert shown["handlers"] == 0, shown
    assert "application/javascript was removed" in cell.text, cell
    written = [v for v in VECTORS if (lab.root / f"pwned-{prefix}{v}.txt").exists()]
    assert written == [], f"the cell's output wrote files through /api/contents: {written}"
    assert lab.call("GET", "api/terminals") == [], "the cell's output opened a terminal"


def test_output_of_a_cell_cannot_run_in_jupyterlab(page: LabPage, lab: LabServer) -> None:
    write_notebook(lab, "policy-magic.ipynb", "python3", ["%load_ext crucible_jupyter", MAGIC_CELL])
    write_notebook(lab, "policy-kernel.ipynb", "crucible", [KERNEL_CELL])
    assert lab.call("GET", "api/terminals") == []  # terminals are on: their absence means

    page.open("policy-magic.ipynb", PYTHON3)
    page.run_cell(0)
    page.wait_cell(0, lambda c: c.done, "%load_ext to finish")
    _run_and_check(page, lab, 1, "magic-")

    page.open("policy-kernel.ipynb", CRUCIBLE)
    _run_and_check(page, lab, 0, "kernel-")


# ----- every attack of the unit tests, cleaned, then given to Chromium as Lab does --------

# What JupyterLab does with trusted HTML output (renderHTML): set innerHTML, then re-create
# each <script> so that it runs. Here every way a payload could act is a recorder, and the
# cleaned SVG is also shown inline (as an exported notebook would) and as an <img>.
_RENDER_JS = """
const [items] = arguments;
window.ran = [];
const record = name => (...args) => { window.ran.push(name + ':' + String(args[0]).slice(0, 80)); };
for (const name of ['alert', 'confirm', 'prompt', 'fetch', 'open', 'eval']) {
  window[name] = record(name);
}
const title = document.title;
for (const [id, html, svg] of items) {
  const host = document.createElement('div');
  host.setAttribute('data-case', id);
  host.innerHTML = html;
  document.body.appendChild(host);
  for (const old of Array.from(host.querySelectorAll('script'))) {
    const s = document.createElement('script');
    s.textContent = old.textContent;
    old.replaceWith(s);
  }
  if (svg) {
    const img = new Image();
    img.src = 'data:image/svg+xml,' + encodeURIComponent(html);
    host.appendChild(img);
  }
}
const risky = [];
for (const el of document.querySelectorAll('[data-case] *')) {
  const id = el.closest('[data-case]').getAttribute('data-case');
  const tag = el.localName;
  if (['script', 'iframe', 'object', 'embed', 'form', 'meta', 'base', 'link', 'style',
       'foreignobject', 'animate', 'set', 'input', 'button', 'textarea'].includes(tag)) {
    risky.push(id + ': <' + tag + '>');
  }
  for (const a of Array.from(el.attributes)) {
    const v = a.value.replace(/[\\u0000-\\u0020]/g, '').toLowerCase();
    if (a.name.startsWith('on') || v.startsWith('javascript:') || v.startsWith('vbscript:')) {
      risky.push(id + ': ' + tag + ' ' + a.name + '=' + a.value.slice(0, 60));
    }
  }
}
return {ran: window.ran, risky: risky, titleChanged: document.title !== title};
"""


def _unit_corpus() -> list[list[Any]]:
    """Every attack payload of tests/unit/test_output_policy.py, cleaned by the policy."""
    import importlib.util
    from pathlib import Path

    from crucible_jupyter.output_policy import clean_bundle

    path = Path(__file__).resolve().parents[1] / "unit" / "test_output_policy.py"
    spec = importlib.util.spec_from_file_location("unit_output_policy", path)
    unit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unit)
    items = []
    for group, mime in (
        (unit.HTML_ATTACKS, "text/html"),
        (unit.MARKDOWN_ATTACKS, "text/markdown"),
        (unit.SVG_ATTACKS, "image/svg+xml"),
    ):
        for name, payload in group.items():
            data, _ = clean_bundle({mime: payload})
            for kind, value in data.items():
                if kind != "text/plain":
                    items.append([f"{mime} {name}", value, kind == "image/svg+xml"])
    return items


def test_every_cleaned_attack_is_inert_in_chromium(browser: Any) -> None:
    items = _unit_corpus()
    assert len(items) > 60, len(items)
    browser.get("about:blank")
    seen = browser.execute_script(_RENDER_JS, items)
    assert seen["risky"] == [], seen["risky"]
    assert seen["ran"] == [], seen["ran"]
    assert not seen["titleChanged"]
