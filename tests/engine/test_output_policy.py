"""A cell's rich output is cleaned before it is stored or streamed (issue 12, item 1).

Real bubblewrap sandboxes through the dispatcher: the cell displays script in every form a
browser would run; the live stream, the stored events (read back from the database itself)
and the history read all carry the cleaned form, and a benign table is kept.
"""

from __future__ import annotations

import textwrap

from crucible_jupyter.models import Event, Status
from tests.helpers.engine import run_cell

ATTACK = textwrap.dedent("""
    steal = "fetch('/api/terminals', {method: 'POST'}); document.title = 'pwned'"
    display({
        "text/html": "<p>chart</p><script>" + steal + "</script>"
                     "<img src=x onerror=\\"" + steal + "\\">",
        "text/plain": "chart",
    }, raw=True)
    display({"application/javascript": steal}, raw=True)
    display({"image/svg+xml": "<svg onload=\\"" + steal + "\\"><script>" + steal
             + "</script><circle r='3'/></svg>"}, raw=True)
    display({"text/markdown": "[x](javascript:alert(1)) <script>" + steal + "</script>"},
            raw=True)
    display({"text/html": "<table class='dataframe'><tr><td>1</td></tr></table>"}, raw=True)
    display({"text/html": "<i>" + "x" * 100000 + "</i><script>" + steal + "</script>"}, raw=True)
""")


def _bundles(events: list[Event]) -> list[dict]:
    return [e.data["data"] for e in events if e.type == "display_data"]


def _assert_clean(bundles: list[dict]) -> None:
    html, script, svg, markdown, table, large = bundles
    assert html == {
        "text/html": "<p>chart</p><img>",
        "text/plain": "chart",
    }, html
    assert set(script) == {"text/plain"}, script
    assert "application/javascript was removed" in script["text/plain"], script
    assert set(svg) == {"image/svg+xml"}, svg
    image = svg["image/svg+xml"]  # (the order of the svg element's xmlns attributes varies)
    assert image.startswith("<svg "), svg
    assert image.endswith('><circle r="3"></circle></svg>'), svg
    assert "script" not in image, svg
    assert "onload" not in image, svg
    assert set(markdown) == {"text/html"}, markdown
    assert "<script" not in markdown["text/html"]
    assert "href" not in markdown["text/html"]
    assert table == {
        "text/html": '<table class="dataframe"><tbody><tr><td>1</td></tr></tbody></table>'
    }, table
    # a frame that large is cleaned off the event loop: the same policy
    assert large == {"text/html": "<i>" + "x" * 100000 + "</i>"}, large["text/html"][-100:]


async def test_script_in_output_is_stored_and_streamed_cleaned(dispatcher):
    execution, streamed = await run_cell(dispatcher, ATTACK)
    assert execution.status is Status.SUCCEEDED, execution.reason
    _assert_clean(_bundles(streamed))
    # what the database holds, read without the dispatcher's read path
    stored = await dispatcher._db(dispatcher.storage.events, execution.id, -1)
    _assert_clean(_bundles(stored))
    _assert_clean(_bundles(await dispatcher.events(execution.id)))


async def test_records_stored_before_the_policy_are_cleaned_when_read(dispatcher):
    execution, events = await run_cell(dispatcher, "print('old record')")
    seq = events[-1].seq + 1
    old = {"data": {"text/html": "<script>alert(1)</script><b>old</b>"}, "metadata": {}}
    # an event written as it was stored before the output policy existed
    await dispatcher._db(
        dispatcher.storage.append_events, execution.id, [Event(seq, 0, "display_data", old)]
    )
    (read,) = [e for e in await dispatcher.events(execution.id) if e.type == "display_data"]
    assert read.data["data"] == {"text/html": "<b>old</b>"}
    followed = [e async for e in dispatcher.subscribe(execution.id, after=seq - 1)]
    assert followed[0].data["data"] == {"text/html": "<b>old</b>"}


async def test_an_operator_can_trust_more_types(make_dispatcher):
    dispatcher = await make_dispatcher(trusted_output_types=["application/javascript"])
    code = "display({'application/javascript': 'console.log(1)'}, raw=True)"
    execution, streamed = await run_cell(dispatcher, code)
    assert execution.status is Status.SUCCEEDED, execution.reason
    assert _bundles(streamed) == [{"application/javascript": "console.log(1)"}]
