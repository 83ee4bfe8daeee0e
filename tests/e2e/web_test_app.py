"""A small Flask app for the web-app tests: what ptth_server puts on the internet, run as a real process.

`python tests/e2e/web_test_app.py [--port N]` serves it with werkzeug's
threaded server (one thread per connection, as a development server runs a
dashboard) on 127.0.0.1 and prints `web test app listening on
http://127.0.0.1:PORT` once it listens (port 0: any free port).

Routes:
- `/`: an HTML page with a form (GET /form); the readiness check.
- `/form`: the form's fields as JSON, from the query (GET) or the body (POST).
- `/json`: echoes a JSON body, with the method.
- `/headers`: the request's method, path and headers as JSON (what the app was sent).
- `/hop`: a response with hop-by-hop headers, one named by its Connection header.
- `/upload`: sha256 and length of the body, read from `request.stream` a
  piece at a time (never whole); `/uploads` lists every upload's outcome
  (complete or not, bytes seen, the error), so a test can tell that an
  upload cut mid-way was seen as cut.
- `/download?bytes=N&seed=S&framing=length|chunked`: N bytes made as they are
  sent (the same blocks as the tests' uploads).
- `/refuse`: 413 without reading the request body.
- `/redirect/absolute`, `/redirect/path`, `/redirect/relative`: 302 to
  `/target`, as an absolute URL on the app's own origin (built from Host),
  as a path, and as a relative reference.
- `/cookies/set` sets two cookies (two Set-Cookie lines); `/cookies/show` shows them.
- `/sse?n=N&interval=S`: server-sent events, each flushed at once with the
  time it was sent.
- `/slow?secs=S`: answers after S seconds.
- `/reset?framing=chunked|length`: sends 64 KiB of a longer body, then
  resets the connection.
- `/ws`: WebSocket echo (flask-sock on simple-websocket): text and binary
  messages come back as they were; the text `close CODE REASON` closes with
  that code; pings are answered with pongs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, redirect, request
from flask_sock import Sock
from werkzeug.serving import make_server

app = Flask(__name__)
sock = Sock(app)

_uploads: list[dict[str, object]] = []
_uploads_lock = threading.Lock()

PAGE = """<!doctype html>
<html><head><title>web test app</title></head>
<body><h1>web test app</h1>
<form action="form" method="get"><input name="q" value="tunnel"><button>Go</button></form>
</body></html>
"""


@app.route("/")
def index() -> str:
    return PAGE


@app.route("/form", methods=["GET", "POST"])
def form() -> Response:
    fields = request.args if request.method == "GET" else request.form
    return jsonify({"method": request.method, "fields": fields.to_dict(flat=False)})


@app.route("/json", methods=["POST", "PUT", "PATCH", "DELETE"])
def echo_json() -> Response:
    return jsonify({"method": request.method, "json": request.get_json()})


@app.route("/headers", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
def headers() -> Response:
    return jsonify({"method": request.method, "path": request.full_path,
                    "headers": [[k.lower(), v] for k, v in request.headers.items()]})


@app.route("/hop")
def hop() -> Response:
    """A response with hop-by-hop headers of its own, one of them named by Connection."""
    return Response("hop\n", mimetype="text/plain", headers={"Connection": "X-Private", "X-Private": "secret",
                                                              "Keep-Alive": "timeout=5", "X-Public": "kept"})


@app.route("/upload", methods=["POST", "PUT"])
def upload() -> Response:
    digest = hashlib.sha256()
    seen = 0
    outcome: dict[str, object] = {"complete": False, "bytes": 0, "error": None,
                                  "content_length": request.content_length,
                                  "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked"}
    try:
        while True:
            piece = request.stream.read(256 * 1024)
            if not piece:
                break
            digest.update(piece)
            seen += len(piece)
        complete = request.content_length is None or seen == request.content_length
        outcome.update(complete=complete, bytes=seen)
    except Exception as e:  # the client (or the proxy) cut the body: record it, then fail as werkzeug would
        outcome.update(bytes=seen, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        with _uploads_lock:
            _uploads.append(outcome)
    return jsonify({"sha256": digest.hexdigest(), "bytes": seen})


@app.route("/download")
def download() -> Response:
    """`bytes` bytes of a repeated SHA-256 block, made as they are sent; with Content-Length or chunked."""
    total = int(request.args.get("bytes", "0"))
    block = hashlib.sha256(request.args.get("seed", "").encode()).digest() * (1024 * 1024 // 32)

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            piece = block[: min(len(block), total - sent)]
            sent += len(piece)
            yield piece

    headers = {"Content-Length": str(total)} if request.args.get("framing") == "length" else {}
    return Response(body(), mimetype="application/octet-stream", headers=headers)


@app.route("/refuse", methods=["POST", "PUT"])
def refuse() -> Response:
    """Answers 413 without reading the body (as an app with an upload limit does)."""
    return Response("too large for this app\n", status=413, mimetype="text/plain")


@app.route("/uploads")
def uploads() -> Response:
    with _uploads_lock:
        return jsonify(list(_uploads))


@app.route("/redirect/absolute")
def redirect_absolute() -> Response:
    return redirect(f"http://{request.host}/target?from=absolute", 302)


@app.route("/redirect/path")
def redirect_path() -> Response:
    return redirect("/target?from=path", 302)


@app.route("/redirect/relative")
def redirect_relative() -> Response:
    return redirect("../target?from=relative", 302)


@app.route("/target")
def target() -> str:
    return f"target from {request.args.get('from', '?')}\n"


@app.route("/cookies/set")
def cookies_set() -> Response:
    response = Response("two cookies\n", mimetype="text/plain")
    response.set_cookie("first", "1", path="/", expires=2_000_000_000)  # the date holds a comma
    response.set_cookie("second", "2", path="/", httponly=True)
    return response


@app.route("/cookies/show")
def cookies_show() -> Response:
    return jsonify(request.cookies.to_dict())


@app.route("/sse")
def sse() -> Response:
    count = int(request.args.get("n", "5"))
    interval = float(request.args.get("interval", "0.2"))

    def events() -> Iterator[str]:
        for i in range(count):
            if i:
                time.sleep(interval)
            yield f"id: {i}\ndata: {json.dumps({'i': i, 'sent': time.time()})}\n\n"

    return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


@app.route("/slow")
def slow() -> str:
    time.sleep(float(request.args.get("secs", "5")))
    return "slow answer\n"


@app.route("/reset")
def reset() -> Response:
    conn = request.environ.get("werkzeug.socket")
    framing = request.args.get("framing", "chunked")

    def body() -> Iterator[bytes]:
        yield b"x" * 65536
        time.sleep(0.2)  # let the first part go out, so that the client has a 200 and part of a body
        if isinstance(conn, socket.socket):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        raise ConnectionAbortedError("the test app resets this response on purpose")

    headers = {"Content-Length": str(1024 * 1024)} if framing == "length" else {}
    return Response(body(), mimetype="application/octet-stream", headers=headers)


@sock.route("/ws")
def websocket(ws) -> None:  # type: ignore[no-untyped-def]
    while True:
        message = ws.receive()
        if isinstance(message, str) and message.startswith("close "):
            _, code, reason = (message.split(" ", 2) + [""])[:3]
            ws.close(int(code), reason)
            return
        ws.send(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = make_server("127.0.0.1", args.port, app, threaded=True)
    print(f"web test app listening on http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
