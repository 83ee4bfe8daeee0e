"""The relay's own answers: one line of text, a redirect to a path, an HttpError.

Every refusal and status line the relay writes itself is text/plain, one
line saying what happened (errors.describe_answer quotes it on the other
side): a `TextAnswer`, which keeps that line so that a browser can be shown
the same news as a page instead (pages.py `as_page`, at the relay's exits). Relayed responses are `RelayedResponse`s: they carry the security
headers of relayed content (trust.py), not those of the relay's own pages.

All are Flask's `Response` (werkzeug's, plus JSON helpers) whether Flask
serves them or not: Flask would otherwise convert a plain werkzeug response
into its own class, and a relayed response would lose its type on the way.
"""

from __future__ import annotations

from flask import Response

from ptth_lib.errors import HttpError


class RelayedResponse(Response):
    """A response relayed from a server: its own security headers, not the relay pages'."""


class TextAnswer(Response):
    """One line of text the relay says itself; `message` is that line."""

    message: str = ""


def text(status: int, message: str) -> Response:
    """A text/plain answer: `message` as one line."""
    resp = TextAnswer(message + "\n", status=status, content_type="text/plain; charset=utf-8")
    resp.message = message
    return resp


def error_response(e: HttpError) -> Response:
    """The answer an HttpError stands for: its status and message, and Retry-After if it has one."""
    resp = text(e.status, str(e))
    if e.retry_after_secs is not None:
        resp.headers["Retry-After"] = str(e.retry_after_secs)
    return resp


def redirect(location: str, status: int) -> Response:
    """A redirect to a path on this host (a relative or "/..." location, never "//host")."""
    resp = text(status, f"see {location}")
    resp.headers["Location"] = location
    return resp
