"""How the relay's own pages look: its templates on the shared look, and error answers as pages.

Every page the relay makes itself is a template of templates/ extending the
shared base.html (ptth_lib/pages), autoescaped, so a server's name or display
name (or anything else a server, a client or the config put there) is shown
as text, never as markup. Like the shared stylesheet, the relay's own
(static/relay.css: the dashboard, its charts, badges) is inlined, and the
page's CSP allows exactly those two by hash (`PAGE_CSP`): a page stands
alone, with nothing else to fetch, which matters most for error pages, often
shown on a host that belongs to a server (host routing, where every path is
the server's) or while the relay is refusing requests (429, 503).

An error the relay answers itself is a `TextAnswer` (responses.py): one line
of text, which curl, requests and PTTH's own programs read. `as_page` turns it
into a page for a browser (a client whose Accept prefers text/html,
pages.wants_html), in plain words with what to do next, and the line itself
below.
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
from markupsafe import Markup
from werkzeug.wrappers import Response as WerkzeugResponse

from ptth_lib import pages
from ptth_lib.relay import trust
from ptth_lib.relay.responses import TextAnswer

_HERE = Path(__file__).parent

# The relay's own styles, added to the shared stylesheet on each of its pages.
RELAY_STYLESHEET = (_HERE / "static" / "relay.css").read_text("utf-8")
RELAY_STYLE_SOURCE = ("'sha256-" + base64.b64encode(hashlib.sha256(RELAY_STYLESHEET.encode()).digest()).decode()
                      + "'")

# The CSP of the relay's HTML pages: the shared pages' policy (no script, never
# framed, whatever the shared look needs) whose style-src also allows the relay's stylesheet.
PAGE_CSP = pages.PAGE_CSP.replace(f"style-src {pages.STYLE_SOURCE}", f"style-src {pages.STYLE_SOURCE} "
                                  f"{RELAY_STYLE_SOURCE}")
assert RELAY_STYLE_SOURCE in PAGE_CSP and "frame-ancestors 'none'" in PAGE_CSP

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
    """The shared environment (filters, autoescape, StrictUndefined) reading the relay's templates first."""
    shared = pages.ENVIRONMENT
    assert shared.loader is not None
    env = shared.overlay(loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(_HERE / "templates"), shared.loader]))
    env.globals["relay_stylesheet"] = Markup(RELAY_STYLESHEET)  # as it is, to match its hash
    return env


def render(template: str, status: int = 200, **context: Any) -> Response:
    """A page from `template` (which sees `status` too), with its CSP; never cached: it shows live state."""
    body = environment().get_template(template).render(status=status, **context)
    resp = Response(body, status=status, content_type="text/html; charset=utf-8")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    return resp


def plain_words(status: int) -> tuple[str, str]:
    """An error status's heading and advice for people."""
    return _PLAIN_WORDS.get(status, _FALLBACK_WORDS)


def error_page(status: int, message: str) -> bytes:
    """The page for an error `status` whose line is `message`."""
    title, advice = plain_words(status)
    return environment().get_template("relay_error.html").render(
        status=status, title=title, advice=advice, message=message).encode("utf-8")


def as_page(resp: AnyResponse, environ: Mapping[str, Any]) -> AnyResponse:
    """An error line of the relay's own as a page, if the client prefers HTML; else `resp` unchanged.

    Changed in place, so what was set to run when it closes (metrics,
    connection handling) still runs; its status and other headers stay.
    """
    if not isinstance(resp, TextAnswer) or resp.status_code < 400 \
            or not pages.wants_html(environ.get("HTTP_ACCEPT")):
        return resp
    resp.set_data(error_page(resp.status_code, resp.message))
    resp.content_type = "text/html; charset=utf-8"
    resp.headers["Cache-Control"] = "no-store"
    for name, value in trust.RELAY_PAGE_HEADERS:
        resp.headers[name] = value
    resp.headers["Content-Security-Policy"] = PAGE_CSP
    return resp
