"""How the relay's own pages look: templates, the stylesheet, and error answers as pages.

Every page the relay makes itself is a Jinja2 template in templates/ with
autoescape on, so a server's name or display name (or anything else a
server, a client or the config put there) is shown as text, never as markup.
The stylesheets are served by the relay at STATIC_PREFIX (`static_file`),
same-origin, so they load under the relay pages' CSP (trust.RELAY_PAGE_HEADERS,
`style-src 'self'`) with a long cache: their URLs carry a hash of their bytes.

An error the relay answers itself is a `TextAnswer` (responses.py): one line
of text, which curl, requests and PTTH's own programs read. `as_page` turns it
into a page for a browser (a client whose Accept prefers text/html), in plain
words with what to do next, and the line itself below. An error page carries
its stylesheet inline, allowed by the hash of its text in the page's own CSP:
it must stand alone, since it is often shown on a host that belongs to a
server (host routing), where /frontend/static/ is the server's path, or when
the relay is refusing requests (429, 503).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import jinja2
from flask import Response
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header
from werkzeug.wrappers import Response as WerkzeugResponse

from ptth_lib import __version__
from ptth_lib.relay import trust
from ptth_lib.relay.responses import TextAnswer

# Where the relay serves its stylesheets: under /frontend/, which operators already pass to the relay.
STATIC_PREFIX = "/frontend/static/"
# The stylesheets, by the name they are served under; the order they are linked in.
_HERE = Path(__file__).parent
STYLESHEETS: Mapping[str, Path] = {
    "relay.css": _HERE / "static" / "relay.css",
}
# A stylesheet's URL carries a hash of its bytes, so browsers may keep it as long as they like.
STATIC_CACHE_CONTROL = "public, max-age=31536000, immutable"

# Each error status in plain words: a heading, and what the visitor can do about it.
_PLAIN_WORDS: Mapping[int, tuple[str, str]] = {
    400: ("The relay cannot follow this address",
          "The address is malformed or could be read two ways. Check the link you followed."),
    401: ("You need to log in",
          "This page needs a user name and password. Reload the page to be asked again."),
    403: ("You may not see this page",
          "The relay's operator has not allowed your address or key here."),
    404: ("Nothing here",
          "Check the address for a typo, or start again from the list of servers."),
    405: ("Not done that way",
          "This address does not take this kind of request."),
    413: ("Too much to send",
          "What you tried to upload is larger than the relay accepts."),
    429: ("Too many requests at once",
          "Wait a few seconds, then try again."),
    431: ("The request is too large",
          ("Its headers (often cookies) are more than the relay passes on. Clear this site's "
           "cookies, or try another browser.")),
    500: ("Something went wrong in the relay",
          "Try again in a moment. If it goes on, tell the relay's operator."),
    501: ("The relay cannot do this here",
          "The relay's setup does not support this kind of request."),
    502: ("The server cannot be reached",
          ("The server behind this address is offline or gave no usable answer. It may be "
           "restarting: try again in a minute. If it stays offline, tell the person who runs it.")),
    503: ("The relay is busy",
          "It cannot take this request right now. Try again in a few seconds."),
    504: ("The server did not answer in time",
          ("It is connected but slow to answer, or stuck. Try again; if it keeps happening, "
           "tell the person who runs it.")),
}
_FALLBACK_WORDS = ("The relay could not answer this request", "Try again later.")

AnyResponse = TypeVar("AnyResponse", bound=WerkzeugResponse)


@functools.cache
def environment() -> jinja2.Environment:
    """The relay's templates (templates/), autoescaped whatever their names."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(version=__version__, stylesheet_urls=stylesheet_urls)
    return env


def render(template: str, status: int = 200, **context: Any) -> Response:
    """A page from `template` (which sees `status` too); never cached: it shows live state."""
    body = environment().get_template(template).render(status=status, **context)
    resp = Response(body, status=status, content_type="text/html; charset=utf-8")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def prefers_html(accept: str | None) -> bool:
    """Tell whether a client's Accept header puts text/html above text/plain (a browser's does).

    `*/*` (curl, requests, PTTH's programs) and no Accept at all mean text:
    the one line stays what those clients have always read.
    """
    if not accept:
        return False
    return parse_accept_header(accept, MIMEAccept).best_match(["text/plain", "text/html"]) == "text/html"


def plain_words(status: int) -> tuple[str, str]:
    """An error status's heading and advice for people."""
    return _PLAIN_WORDS.get(status, _FALLBACK_WORDS)


def as_page(resp: AnyResponse, environ: Mapping[str, Any]) -> AnyResponse:
    """An error line of the relay's own as a page, if the client prefers HTML; else `resp` unchanged.

    Changed in place, so what was set to run when it closes (metrics,
    connection handling) still runs; its status and other headers stay.
    """
    if not isinstance(resp, TextAnswer) or resp.status_code < 400 \
            or not prefers_html(environ.get("HTTP_ACCEPT")):
        return resp
    title, advice = plain_words(resp.status_code)
    page = environment().get_template("error.html").render(
        status=resp.status_code, title=title, advice=advice, message=resp.message, inline_css=inline_css())
    resp.set_data(page.encode("utf-8"))
    resp.content_type = "text/html; charset=utf-8"
    resp.headers["Cache-Control"] = "no-store"
    for name, value in trust.RELAY_PAGE_HEADERS:
        resp.headers[name] = value
    resp.headers["Content-Security-Policy"] = error_page_csp()
    return resp


def inline_css() -> str:
    """Every stylesheet as one text, for an error page's <style>."""
    return _inline_css()[0]


@functools.cache
def error_page_csp() -> str:
    """The relay pages' CSP, whose style-src allows exactly the inline stylesheet of an error page."""
    csp = dict(trust.RELAY_PAGE_HEADERS)["Content-Security-Policy"]
    parts = [p.strip() for p in csp.split(";")]
    style_src = f"style-src '{_inline_css()[1]}'"
    return "; ".join(style_src if p.startswith("style-src ") else p for p in parts)


def static_file(name: str) -> Response | None:
    """A stylesheet by the name it is served under, with a long cache; None if there is none."""
    found = _stylesheet(name)
    if found is None:
        return None
    data, _ = found
    resp = Response(data, content_type="text/css; charset=utf-8")
    resp.headers["Cache-Control"] = STATIC_CACHE_CONTROL
    return resp


def stylesheet_urls() -> list[str]:
    """The stylesheets' URLs, each with its bytes' hash (so a new version is a new URL)."""
    urls = []
    for name in STYLESHEETS:
        found = _stylesheet(name)
        if found is not None:
            urls.append(f"{STATIC_PREFIX}{name}?v={found[1]}")
    return urls


@functools.cache
def _stylesheet(name: str) -> tuple[bytes, str] | None:
    """A stylesheet's bytes and a short hash of them, read once (they ship with the code)."""
    path = STYLESHEETS.get(name)
    if path is None:
        return None
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:12]


@functools.cache
def _inline_css() -> tuple[str, str]:
    """Every stylesheet as one text, and its CSP hash source ("sha256-...")."""
    sheets = [_stylesheet(name) for name in STYLESHEETS]
    css = "\n".join(found[0].decode("utf-8") for found in sheets if found is not None)
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return css, f"sha256-{digest}"
