"""What a cell's rich output may carry to a browser: crucible's one output policy.

A cell is hostile, and its rich output (``display_data``, ``update_display_data``,
``execute_result``) ends up in JupyterLab, where output produced in a live session is
*trusted*: HTML is inserted as it is and its scripts run on the Jupyter origin, with the
user's session (they can write files through ``/api/contents`` and open a terminal through
``/api/terminals``). :func:`clean_output` is the single place that decides what such a
payload may carry; the dispatcher applies it to every frame as it arrives (so stored history
and every live consumer get the cleaned form) and to stored events as they are read (records
stored before this policy existed), and the ``%%crucible`` magic and the crucible kernel
apply it again just before they display (it is idempotent). Its promises:

* **passed as they are** (:data:`PASSED_TYPES`): ``text/plain``, ``text/latex`` (JupyterLab
  typesets it with MathJax's "safe" extension, which refuses ``javascript:`` links),
  ``application/json`` (a tree view of data), and raster images (``image/png``,
  ``image/jpeg``, ``image/gif``, ``image/webp``, ``image/bmp``; only when they are base64
  text, as Jupyter sends them). None of these can run code in the browser.
* **sanitized** (:data:`SANITIZED_TYPES`): ``text/html`` keeps an allow-list of inert
  elements (text, tables, lists, headings, links, images) and attributes; no ``<script>``,
  ``<style>``, event handlers, ``<iframe>``, ``<object>``/``<embed>``, forms, ``<meta>``,
  ``<base>``, ``<link>``, ``<template>``, inline SVG/MathML, ``id``/``name`` (which could
  clobber the page's own globals), JupyterLab's and CodeMirror's CSS classes (``jp-``,
  ``lm-``, ``cm-``: they would let output dress up as Lab's UI) or CSS that positions, loads
  URLs (``url()``) or hides escapes; links only to ``http``/``https``/``mailto``, images
  only from ``data:`` raster URLs (an external image would be a request from the user's
  browser: a way out of a sandbox that has no network). ``text/markdown`` is rendered to
  HTML here (GitHub Flavored Markdown, with cmarkgfm: GitHub's cmark-gfm in C, linear in
  time by design, the renderer PyPI uses for untrusted READMEs, with nh3) and that HTML is
  sanitized the same way; it leaves as ``text/html`` — JupyterLab renders raw HTML inside
  Markdown, and cleaning the HTML that results, rather than the Markdown text, leaves no
  difference between two parsers to exploit. ``image/svg+xml`` keeps static SVG shapes,
  text, gradients, clip paths and markers: no ``<script>``, ``<style>``,
  ``<foreignObject>``, ``<a>``, animation (``<animate>``, ``<set>`` could set an ``href`` or
  a handler), event handlers, references outside the image (``href`` and ``url()`` only to
  ``#fragment``, ``<image>`` only from a ``data:`` raster URL).
* **removed** everything else: scripts (``application/javascript``, ``text/javascript``...)
  and every type crucible does not know to be inert — including the renderers JupyterLab
  extensions add (``application/vnd.jupyter.widget-view+json``, Plotly's, Vega's, Bokeh's),
  which run JavaScript renderers on the data; ``application/pdf`` (a PDF viewer in a frame,
  with its own scripting), ``text/vnd.mermaid`` (a renderer with a history of script
  injection) and ``application/geo+json`` (its map loads tiles from the network) too. A
  removed type leaves a short visible notice in ``text/plain`` (and at the end of the HTML,
  when HTML is what will be shown) naming it and :data:`SETTING`.
* **metadata** stays JSON and bounded (:data:`METADATA_LIMIT`): entries of types that were
  removed go, and so do ``isolated`` (JupyterLab then re-parses the output's HTML into a
  same-origin frame, outside this sanitizer's view) and ``trusted``; ``transient`` keeps only
  a string ``display_id``.
* **bounded cost**: markup nested deeper than :data:`MAX_DEPTH` (deeper than browsers show)
  and Markdown larger than :data:`MAX_MARKDOWN` are not parsed (a notice says so; the
  Markdown is then shown as plain text), since an HTML parser's work grows with nesting and
  this runs in the process that serves every user. Text that is not valid UTF-8 (lone
  surrogates) has them shown as escapes instead of failing.
* an operator may pass more types unchanged (``c.CrucibleDispatcher.trusted_output_types``,
  env :data:`ENV_TRUSTED_TYPES`): a type listed there is not looked at at all, so anything
  listed is as dangerous as the renderer it reaches (see the setting's help).

The sanitizer is nh3, the Python binding of the Rust crate ammonia: maintained, allow-list
based, and it parses with html5ever, an implementation of the same HTML5 parsing algorithm
browsers use (so what it keeps is what the browser will see). bleach, the usual Python
choice, is deprecated (its html5lib parser is no longer maintained).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import nh3

from .protocol import ENV_TRUSTED_OUTPUT_TYPES
from .protocol import clean_utf8 as _utf8

#: Where an operator widens the policy; named in every notice.
SETTING = "c.CrucibleDispatcher.trusted_output_types"
#: Environment variable with extra trusted types (comma separated); the Jupyter server
#: extension exports its dispatcher's setting to kernels in it.
ENV_TRUSTED_TYPES = ENV_TRUSTED_OUTPUT_TYPES
#: Event types whose payload is a MIME bundle (``data``, ``metadata``, ``transient``).
DISPLAY_KINDS = ("display_data", "update_display_data", "execute_result")

_TEXT_TYPES = frozenset({"text/plain", "text/latex"})
_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"})
#: Types passed as they are (after a check of their form): none of them can run code.
PASSED_TYPES = _TEXT_TYPES | _IMAGE_TYPES | {"application/json"}
#: Types kept after sanitizing (``text/markdown`` leaves as ``text/html``).
SANITIZED_TYPES = frozenset({"text/html", "text/markdown", "image/svg+xml"})
#: Script types: named as such in the notice.
SCRIPT_TYPES = frozenset(
    {
        "application/javascript",
        "application/x-javascript",
        "application/ecmascript",
        "text/javascript",
        "text/ecmascript",
        "text/x-javascript",
        "application/vnd.jupyter.widget-view+json",
        "application/vnd.jupyter.widget-state+json",
    }
)
#: Largest metadata kept, as JSON text; larger metadata is dropped whole.
METADATA_LIMIT = 64 * 1024
_DROPPED_METADATA = frozenset({"isolated", "trusted"})
_MAX_NAMED = 5  # removed types named in a notice; the rest are counted

_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]*")
_DATA_IMAGE = re.compile(r"data:image/(?:png|jpeg|gif|webp|bmp);base64,[A-Za-z0-9+/=\s]*")
_SCHEME = re.compile(r"([a-z][a-z0-9+.\-]*):")
_URL_FN = re.compile(r"url\(\s*(['\"]?)\s*([^)'\"]*)", re.IGNORECASE)
_LAB_CLASS = re.compile(r"(?:jp|lm|jupyter|cm)-", re.IGNORECASE)  # Lab's, CodeMirror's
_PLAIN_TYPE = re.compile(r"[\x21-\x7e]{1,100}")

# ----- HTML ---------------------------------------------------------------------------------

_HTML_TAGS = {
    *("a", "abbr", "article", "aside", "b", "bdi", "bdo", "blockquote", "br", "caption"),
    *("center", "cite", "code", "col", "colgroup", "data", "dd", "del", "details", "dfn"),
    *("div", "dl", "dt", "em", "figcaption", "figure", "footer", "h1", "h2", "h3", "h4"),
    *("h5", "h6", "header", "hgroup", "hr", "i", "img", "ins", "kbd", "li", "mark", "nav"),
    *("ol", "p", "pre", "q", "rp", "rt", "rtc", "ruby", "s", "samp", "section", "small"),
    *("span", "strike", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot"),
    *("th", "thead", "time", "tr", "tt", "u", "ul", "var", "wbr"),
}
# removed with everything inside them (not only the tag): their content is code, another
# document, or text an HTML parser reads differently depending on context
_HTML_DROPPED_WHOLE = {
    *("script", "style", "iframe", "frame", "frameset", "object", "embed", "applet"),
    *("noscript", "noembed", "noframes", "template", "textarea", "title", "xmp"),
    *("plaintext", "svg", "math", "select", "option", "canvas", "audio", "video"),
}
_TABLE_CELL = {"align", "valign", "colspan", "rowspan", "headers", "scope", "width", "height"}
_HTML_ATTRIBUTES = {
    "*": {"class", "title", "lang", "dir", "style"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height", "align"},
    "table": {"align", "border", "cellpadding", "cellspacing", "summary", "width"},
    "thead": {"align", "valign"},
    "tbody": {"align", "valign"},
    "tfoot": {"align", "valign"},
    "tr": {"align", "valign"},
    "th": _TABLE_CELL,
    "td": _TABLE_CELL,
    "col": {"align", "span", "width"},
    "colgroup": {"align", "span", "width"},
    "ol": {"start", "type", "reversed"},
    "li": {"value"},
    "details": {"open"},
    "time": {"datetime"},
    "data": {"value"},
    "bdo": {"dir"},
    "hr": {"width", "align", "size"},
}
# CSS properties a style attribute may set: none takes a URL, positions the element outside
# its output, or stacks it over the page
_CSS_TEXT = {
    *("color", "background-color", "opacity", "font", "font-family", "font-size"),
    *("font-style", "font-variant", "font-weight", "line-height", "letter-spacing"),
    *("word-spacing", "text-align", "text-decoration", "text-decoration-color"),
    *("text-decoration-line", "text-decoration-style", "text-indent", "text-transform"),
    *("text-overflow", "vertical-align", "white-space", "word-break", "word-wrap"),
    *("overflow-wrap", "direction", "unicode-bidi", "list-style-type", "display"),
    *("visibility", "overflow", "overflow-x", "overflow-y", "box-sizing", "caption-side"),
    *("table-layout", "empty-cells", "border-collapse", "border-spacing"),
}
_CSS_BOX = {
    f"{prop}{side}"
    for prop in ("padding", "border", "border-width", "border-style", "border-color")
    for side in ("", "-top", "-right", "-bottom", "-left")
} | {
    f"border-{side}-{part}"
    for side in ("top", "right", "bottom", "left")
    for part in ("width", "style", "color")
}
_CSS_SIZE = {"width", "height", "min-width", "max-width", "min-height", "max-height"}
_HTML_CSS = _CSS_TEXT | _CSS_BOX | _CSS_SIZE | {"border-radius"}


def _scheme(url: str) -> str | None:
    """The scheme of ``url`` as a browser reads it (it drops ASCII whitespace and control
    characters first), lower case; None for a relative URL."""
    m = _SCHEME.match(re.sub(r"[\x00-\x20\x7f]+", "", url).lower())
    return m.group(1) if m else None


def _safe_css(value: str, *, fragments: bool) -> bool:
    """Whether a CSS value can load nothing: no ``url()`` (with ``fragments``: only to a
    ``#fragment`` of the same document), no escapes that could hide one, no ``@`` rules,
    no ``expression()``."""
    lower = value.lower()
    if "\\" in value or "@" in value or "expression" in lower or "/*" in value:
        return False
    return all(fragments and m.group(2).startswith("#") for m in _URL_FN.finditer(value))


def _html_attribute(element: str, attribute: str, value: str) -> str | None:
    if attribute == "href":
        return value if element == "a" and _scheme(value) in ("http", "https", "mailto") else None
    if attribute == "src":
        return value if element == "img" and _DATA_IMAGE.fullmatch(value.strip()) else None
    if attribute == "style":
        return value if _safe_css(value, fragments=False) else None
    if attribute == "class":
        kept = [c for c in value.split() if not _LAB_CLASS.match(c)]
        return " ".join(kept) or None
    return value


def _cleaner(
    tags: set[str],
    dropped_whole: set[str],
    attributes: dict[str, set[str]],
    attribute_filter: Any,
    css: set[str],
    **policy: Any,
) -> nh3.Cleaner:
    """An nh3 cleaner keeping only ``tags`` and ``attributes`` (each value passed through
    ``attribute_filter``) and the ``css`` properties in style attributes, dropping
    ``dropped_whole`` with everything inside and every comment; ``policy``: what differs
    between HTML and SVG (links, URL schemes, fixed attributes)."""
    return nh3.Cleaner(
        tags=tags,
        clean_content_tags=dropped_whole,
        attributes=attributes,
        attribute_filter=attribute_filter,
        filter_style_properties=css,
        strip_comments=True,
        **policy,
    )


_HTML = _cleaner(
    _HTML_TAGS,
    _HTML_DROPPED_WHOLE,
    _HTML_ATTRIBUTES,
    _html_attribute,
    _HTML_CSS,
    link_rel="noopener noreferrer",
    url_schemes={"http", "https", "mailto", "data"},
    url_relative="deny",
)

# ----- SVG ----------------------------------------------------------------------------------

_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_NS = "http://www.w3.org/1999/xlink"
_SVG_TAGS = {
    *("svg", "g", "defs", "symbol", "use", "desc", "title", "path", "rect", "circle"),
    *("ellipse", "line", "polyline", "polygon", "text", "tspan", "textPath", "clipPath"),
    *("mask", "pattern", "marker", "linearGradient", "radialGradient", "stop", "image"),
}
_SVG_DROPPED_WHOLE = {
    *("script", "style", "foreignObject", "iframe", "object", "embed", "noscript"),
    *("template", "textarea", "xmp", "noembed", "noframes", "plaintext", "metadata"),
}
_SVG_PRESENTATION = {
    *("fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-linecap"),
    *("stroke-linejoin", "stroke-dasharray", "stroke-dashoffset", "stroke-miterlimit"),
    *("stroke-opacity", "opacity", "clip-path", "clip-rule", "mask", "marker-start"),
    *("marker-mid", "marker-end", "color", "display", "visibility", "font-family"),
    *("font-size", "font-style", "font-weight", "font-variant", "font-stretch"),
    *("text-anchor", "dominant-baseline", "alignment-baseline", "baseline-shift"),
    *("letter-spacing", "word-spacing", "text-decoration", "writing-mode", "stop-color"),
    *("stop-opacity", "shape-rendering", "text-rendering", "image-rendering"),
    *("vector-effect", "paint-order", "transform-origin"),
}
_SVG_ATTRIBUTES = {
    "*": {
        *_SVG_PRESENTATION,
        *("id", "class", "style", "transform", "x", "y", "width", "height", "d", "points"),
        *("x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry", "fx", "fy", "dx", "dy"),
        *("rotate", "offset", "viewBox", "preserveAspectRatio", "version", "space"),
        *("gradientUnits", "gradientTransform", "spreadMethod", "patternUnits"),
        *("patternContentUnits", "patternTransform", "clipPathUnits", "maskUnits"),
        *("maskContentUnits", "markerWidth", "markerHeight", "markerUnits", "refX", "refY"),
        *("orient", "textLength", "lengthAdjust", "startOffset", "pathLength", "href"),
    },
}
_SVG_CSS = _SVG_PRESENTATION | _CSS_TEXT


def _svg_attribute(element: str, attribute: str, value: str) -> str | None:
    if "\\" in value:  # CSS escapes could spell url( or expression( unseen
        return None
    if attribute == "href":
        if element == "image":
            return value if _DATA_IMAGE.fullmatch(value.strip()) else None
        return value if value.startswith("#") else None
    if attribute == "style" or attribute in _SVG_PRESENTATION or "url(" in value.lower():
        return value if _safe_css(value, fragments=True) else None
    return value


_SVG = _cleaner(
    _SVG_TAGS,
    _SVG_DROPPED_WHOLE,
    _SVG_ATTRIBUTES,
    _svg_attribute,
    _SVG_CSS,
    link_rel=None,
    url_schemes={"data"},
    url_relative=lambda url: url if url.startswith("#") else None,
    set_tag_attribute_values={"svg": {"xmlns": _SVG_NS, "xmlns:xlink": _XLINK_NS}},
)

# ----- cost bounds ----------------------------------------------------------------------------
# html5ever's tree builder (like a browser's) does work in proportion to the depth of the open
# elements for many tags, and more for formatting elements left open: 100,000 nested <div>
# (500 KB) take 40 s, 20,000 <div><b a=N></div> more than 10 minutes, in the process that
# serves every user. A cell must not be able to buy that with its output, so markup whose
# nesting estimate passes MAX_DEPTH is not parsed at all. Browsers stop nesting at 512
# (Chromium's parser limit), so no markup that renders as its author meant is refused.

#: Deepest nesting of elements (as :func:`nesting_depth` estimates it) that is sanitized.
MAX_DEPTH = 512
#: Largest Markdown text rendered (cmark-gfm takes up to ~0.5 s per MB of adversarial text).
MAX_MARKDOWN = 1 << 20

_TAG = re.compile(r"<(/?)([A-Za-z][^\s/>\x00]*)[^>]*?(/?)>")
_VOID = frozenset(
    {
        *("area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr"),
        *("image", "img", "input", "keygen", "link", "meta", "param", "source", "track"),
        "wbr",
    }
)
# HTML start tags that end foreign (SVG/MathML) content
_BREAKOUT = frozenset(
    {
        *("b", "big", "blockquote", "body", "br", "center", "code", "dd", "div", "dl", "dt"),
        *("em", "embed", "h1", "h2", "h3", "h4", "h5", "h6", "head", "hr", "i", "img", "li"),
        *("listing", "menu", "meta", "nobr", "ol", "p", "pre", "ruby", "s", "small"),
        *("span", "strong", "strike", "sub", "sup", "table", "tt", "u", "ul", "var", "font"),
    }
)
# foreign elements whose content is HTML again
_INTEGRATION = frozenset(
    {"foreignobject", "desc", "title", "mi", "mo", "mn", "ms", "mtext", "annotation-xml"}
)
# a start tag that closes open elements of these names at the top (as every parser does)
_CLOSES = {
    "td": ("td", "th"),
    "th": ("td", "th"),
    "tr": ("td", "th", "tr"),
    "tbody": ("td", "th", "tr", "tbody", "thead", "tfoot"),
    "thead": ("td", "th", "tr", "tbody", "thead", "tfoot"),
    "tfoot": ("td", "th", "tr", "tbody", "thead", "tfoot"),
    "li": ("li", "p"),
    "dt": ("dt", "dd", "p"),
    "dd": ("dt", "dd", "p"),
    "option": ("option",),
    "p": ("p",),
}


class TooComplex(ValueError):
    """Markup or Markdown too deep or too large to be cleaned at a bounded cost."""


def nesting_depth(markup: str, limit: int = MAX_DEPTH) -> int:
    """An estimate, never below what an HTML parser builds for the cases that cost it
    time, of how deeply ``markup`` nests elements; counting stops past ``limit``.

    Linear: one pass over the tags. An end tag closes only the element on top (a parser
    may close more, or ignore it and keep elements open: counting them open is the safe
    side), a start tag closes only what every parser closes for it at the top (``<td>`` an
    open cell, ``<li>`` an open item...); comments and script text count as markup.
    """
    stack: list[tuple[str, bool]] = []  # (name, foreign)
    deepest = 0
    for m in _TAG.finditer(markup):
        name = m.group(2).lower()
        if m.group(1):  # an end tag
            if stack and stack[-1][0] == name:
                stack.pop()
            continue
        top = stack[-1] if stack else None
        in_foreign = top is not None and top[1] and top[0] not in _INTEGRATION
        foreign = (in_foreign and name not in _BREAKOUT) or (
            not in_foreign and name in ("svg", "math")
        )
        if foreign and m.group(3):  # self-closing is honoured in SVG and MathML only
            continue
        if not foreign:
            if name in _VOID:
                continue
            closes = _CLOSES.get(name, ())
            while stack and stack[-1][0] in closes:
                stack.pop()
        stack.append((name, foreign))
        if len(stack) > deepest:
            deepest = len(stack)
            if deepest > limit:
                break
    return deepest


def _bounded(markup: str) -> str:
    """``markup`` as valid UTF-8, once its nesting is known to be within bounds."""
    markup = _utf8(markup)
    depth = nesting_depth(markup)
    if depth > MAX_DEPTH:
        raise TooComplex(f"it nests elements more than {MAX_DEPTH} deep, deeper than browsers show")
    return markup


def _render_markdown(text: str) -> str:
    """GitHub Flavored Markdown as HTML, raw HTML and every URL kept: the HTML sanitizer,
    not the renderer, decides what stays (one parser of HTML, the one that is checked)."""
    import cmarkgfm
    from cmarkgfm.cmark import Options

    return cmarkgfm.github_flavored_markdown_to_html(text, options=Options.CMARK_OPT_UNSAFE)


def clean_html(text: str) -> str:
    """``text`` (an HTML fragment) with only inert HTML left (see the module's promises).

    Raises :class:`TooComplex` for markup nested more than :data:`MAX_DEPTH` deep."""
    return _HTML.clean(_bounded(text))


def clean_markdown(text: str) -> str:
    """Markdown ``text`` rendered to HTML, then cleaned by :func:`clean_html`.

    Raises :class:`TooComplex` for text of more than :data:`MAX_MARKDOWN` bytes (or HTML
    in it nested too deep)."""
    text = _utf8(text)
    if len(text) > MAX_MARKDOWN or len(text.encode("utf-8")) > MAX_MARKDOWN:
        raise TooComplex(f"it is larger than {MAX_MARKDOWN >> 20} MiB")
    return clean_html(_render_markdown(text))


def clean_svg(text: str) -> str:
    """An SVG image with only static shapes and text left, still a well-formed XML
    document when the input was a well-formed SVG image (as an ``<img>`` needs).

    Raises :class:`TooComplex` for markup nested more than :data:`MAX_DEPTH` deep."""
    # the HTML serializer writes U+00A0 as &nbsp;, which XML does not define
    return _SVG.clean(_bounded(text)).replace("&nbsp;", "&#160;")


# ----- bundles ------------------------------------------------------------------------------


def trusted_types(value: str | Iterable[str] | None) -> frozenset[str]:
    """MIME types from a setting: a list, or text with commas or spaces between them."""
    if value is None:
        return frozenset()
    items = re.split(r"[\s,]+", value) if isinstance(value, str) else value
    return frozenset(t.strip() for t in items if isinstance(t, str) and t.strip())


def trusted_types_from_env() -> frozenset[str]:
    """The extra trusted types named by :data:`ENV_TRUSTED_TYPES` (none when unset)."""
    return trusted_types(os.environ.get(ENV_TRUSTED_TYPES))


def _text(value: Any) -> str | None:
    """A text value as Jupyter carries it (a string, or a list of lines as in nbformat), as
    valid UTF-8: lone surrogates, which no UTF-8 consumer accepts, become visible escapes."""
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        value = "".join(value)
    return _utf8(value) if isinstance(value, str) else None


def _notice(mime: str, why: str) -> str:
    # the type is the cell's text: no control characters, bidi marks or length of its own
    shown = mime if _PLAIN_TYPE.fullmatch(mime) else json.dumps(mime[:100])
    return f"[crucible: output of type {shown} was removed: {why}; see {SETTING}]"


def _why_removed(mime: str) -> str:
    if mime in SCRIPT_TYPES or "javascript" in mime or "ecmascript" in mime:
        return "it could run code in your browser"
    return "it is not a type crucible knows to be safe to show"


def clean_bundle(
    data: Any, metadata: Any = None, trusted: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(data, metadata)`` of a MIME bundle as it may leave a sandbox (module's promises).

    ``trusted``: extra types passed unchanged. Idempotent: a cleaned bundle is returned
    as it is.
    """
    trusted = trusted if isinstance(trusted, frozenset) else frozenset(trusted)
    out: dict[str, Any] = {}
    notices: list[str] = []
    source = data if isinstance(data, dict) else {}
    for mime, value in source.items():
        if not isinstance(mime, str):
            continue
        if mime in trusted:
            out[mime] = value
            continue
        text = _text(value)
        if mime in _TEXT_TYPES and text is not None:  # noqa: SIM114 -- two reasons to keep
            out[mime] = text
        elif mime in _IMAGE_TYPES and text is not None and _BASE64.fullmatch(text):
            out[mime] = text
        elif mime in _IMAGE_TYPES:
            notices.append(_notice(mime, "it is not base64 image data"))
        elif mime == "application/json":
            out[mime] = value
        elif mime in SANITIZED_TYPES and text is not None:
            if mime == "text/markdown" and "text/html" in source:
                continue  # that HTML is what is shown (it ranks higher)
            try:
                if mime == "text/html":
                    out[mime] = clean_html(text)
                elif mime == "image/svg+xml":
                    out[mime] = clean_svg(text)
                else:
                    out["text/html"] = clean_markdown(text)
            except TooComplex as e:
                notices.append(_notice(mime, str(e)))
                if mime == "text/markdown" and "text/plain" not in source:
                    out["text/plain"] = text  # Markdown reads well enough as text
        elif mime in _TEXT_TYPES or mime in SANITIZED_TYPES:
            notices.append(_notice(mime, "it is not text"))
        else:
            notices.append(_notice(mime, _why_removed(mime)))
    if notices:
        if len(notices) > _MAX_NAMED:
            notices = [*notices[:_MAX_NAMED], f"[crucible: {len(notices) - _MAX_NAMED} more]"]
        notice = "\n".join(notices)
        plain = out.get("text/plain")
        out["text/plain"] = f"{plain.rstrip(chr(10))}\n{notice}" if plain else notice
        if isinstance(out.get("text/html"), str) and "text/html" not in trusted:
            out["text/html"] += f"<pre>{html.escape(notice, quote=False)}</pre>"
    return out, clean_metadata(metadata, out)


def clean_metadata(metadata: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Output metadata without what could change how JupyterLab treats the output:
    ``isolated`` and ``trusted`` go (at the top and per type), so do entries of types no
    longer in ``data``; more than :data:`METADATA_LIMIT` bytes of JSON is dropped whole."""
    if not isinstance(metadata, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or key in _DROPPED_METADATA:
            continue
        if "/" in key:  # metadata of one MIME type
            if key not in data or not isinstance(value, dict):
                continue
            value = {
                k: v for k, v in value.items() if isinstance(k, str) and k not in _DROPPED_METADATA
            }
        out[key] = value
    try:
        size = len(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return {}
    return out if size <= METADATA_LIMIT else {}


def clean_output(kind: str, payload: dict[str, Any], trusted: Iterable[str] = ()) -> dict[str, Any]:
    """The payload of an output event of type ``kind`` as it may reach a browser.

    For ``display_data``, ``update_display_data`` and ``execute_result``: ``data`` and
    ``metadata`` cleaned by :func:`clean_bundle`, ``transient`` reduced to a string
    ``display_id``; other keys (``seq``, ``t``, ``type``...) are kept. Other kinds (stream
    text, error tracebacks: JupyterLab shows them as text) are returned as they are. Never
    changes ``payload``; idempotent.
    """
    if kind not in DISPLAY_KINDS or not isinstance(payload, dict):
        return payload
    data, metadata = clean_bundle(payload.get("data"), payload.get("metadata"), trusted)
    out = {**payload, "data": data, "metadata": metadata}
    if "transient" in payload:
        transient = payload["transient"]
        display_id = transient.get("display_id") if isinstance(transient, dict) else None
        if isinstance(display_id, str):
            out["transient"] = {"display_id": display_id}
        else:
            del out["transient"]
    return out


__all__ = [
    "DISPLAY_KINDS",
    "ENV_TRUSTED_TYPES",
    "PASSED_TYPES",
    "SANITIZED_TYPES",
    "SETTING",
    "TooComplex",
    "clean_bundle",
    "clean_html",
    "clean_markdown",
    "clean_metadata",
    "clean_output",
    "clean_svg",
    "nesting_depth",
    "trusted_types",
    "trusted_types_from_env",
]
