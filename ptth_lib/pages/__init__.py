"""The shared look of PTTH's HTML pages: templates, one stylesheet, and how to answer people and programs.

`render(name, **context)` fills a template of `templates/` (all extend
`base.html`) with a Jinja2 environment that works outside Flask: autoescape
on, so every value is HTML-escaped unless marked safe, and StrictUndefined, so
a missing variable is an error rather than an empty string. Filters:
`human_size` (1536 -> "1.5 KiB") and `format_time` / `iso_time` (seconds
since the epoch, shown in UTC).

How the stylesheet reaches the page: inlined, in one `<style>` element whose
hash is in `STYLE_SOURCE`. A page is served in two very different places: the
relay's own pages, and the file server's, which a browser reaches under
`/frontend/servers/NAME/files/...` through the relay or at `/files/...` from
`ptth_file_server.py`. A linked stylesheet would need a path of its own in
both: the server hands only `/files/` to the file server when it also has a
web app (every other path is the app's), so the file server has no reserved
path outside the tree it serves, and inside it any name is a file's. A relayed
page also runs in the sandbox the relay gives untrusted servers (an opaque
origin), where `'self'` in a policy is no simple matter. A hash needs nothing
of that: add `STYLE_SOURCE` to the page's `style-src` (`PAGE_CSP` does) and the
page works under a policy that forbids inline styles otherwise; no
`'unsafe-inline'`, no nonce to make per answer. The stylesheet is about 5 KB,
sent with each page. `STYLESHEET` is its text, for whoever wants to serve it as
a file too. Nothing is loaded from elsewhere (no CDN, no web fonts): the pages
work on an isolated network; icons are inline SVG.

`wants_html(accept)` tells a browser (HTML) from curl and scripts (one line of
text): only an Accept header that names text/html above text/plain gets HTML,
and `*/*` does not.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from ptth_lib import __version__

_HERE = Path(__file__).parent

STYLESHEET = (_HERE / "static" / "ptth.css").read_text("utf-8")

# The CSP source that allows exactly the inlined stylesheet (CSP 3, "hash-source").
STYLE_SOURCE = "'sha256-" + base64.b64encode(hashlib.sha256(STYLESHEET.encode()).digest()).decode() + "'"

# A policy for pages made from base.html: the inlined stylesheet and same-origin
# images, nothing else (no script at all); never framed.
PAGE_CSP = (f"default-src 'none'; style-src {STYLE_SOURCE}; img-src 'self'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")

_UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_size(size: int) -> str:
    """Bytes as people read them: 999 -> "999 B", 1536 -> "1.5 KiB", 5 * 2**30 -> "5.0 GiB"."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            # 1023.96 KiB would round to "1024.0 KiB": say 1.0 MiB instead.
            if round(value, 1) >= 1024 and unit != _UNITS[-1]:
                continue
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_time(seconds: float) -> str:
    """A moment as "2026-05-01 14:03" in UTC (the page says so where it matters)."""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds))


def iso_time(seconds: float) -> str:
    """A moment for a `<time datetime>` attribute: "2026-05-01T14:03:09Z"."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def wants_html(accept: str | None) -> bool:
    """Tell whether the client asked for HTML: browsers do, curl's `*/*` and no header do not.

    HTML wins only when text/html (or XHTML) is named and ranks above text/plain,
    so a client that accepts anything gets the plain one-line answer.
    """
    if not accept:
        return False
    parsed = parse_accept_header(accept, MIMEAccept)
    html_q = max(_named_quality(parsed, "text/html"), _named_quality(parsed, "application/xhtml+xml"))
    return html_q > 0 and html_q >= parsed["text/plain"]  # text/plain's quality, by name or wildcard


def _named_quality(accept: MIMEAccept, mimetype: str) -> float:
    """The quality the header gives `mimetype` by name (not through a wildcard), 0 if unnamed."""
    return max((q for value, q in accept if value.lower() == mimetype), default=0)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["human_size"] = human_size
    env.filters["format_time"] = format_time
    env.filters["iso_time"] = iso_time
    # Markup: the stylesheet goes in as it is, so it matches its hash in STYLE_SOURCE.
    env.globals["stylesheet"] = Markup(STYLESHEET)
    env.globals["version"] = __version__
    return env


ENVIRONMENT = _environment()


def render(template: str, **context: Any) -> str:
    """Fill `template` (a file name under templates/) with `context`, every value HTML-escaped."""
    return ENVIRONMENT.get_template(template).render(**context)
