"""ptth_server's side of TCP port forwarding (spec 003): the server-side proxy.

For each name in the config's `[forwarded_ports]` one thread long-polls the
relay (`tcp_listen`). When a client connects, the relay answers with a
connection id; a new thread connects to that port's local address (and to no
other: the relay only ever names a port, never an address), then accepts the
connection (`tcp_accept`, whose response body is the client's bytes) and
POSTs the local server's bytes back (`tcp_downstream`), spliced with the
TCP socket in two threads (splice.py, http_streams.py). If the local address
does not answer, it refuses (`tcp_refuse`), and the client gets a 502 with
the reason.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

import requests

from ptth_lib import __version__
from ptth_lib.config import ServerConfig
from ptth_lib.errors import backoff_secs, describe_answer, root_cause
from ptth_lib.forward.http_streams import HTTP_ERRORS, RelayStreams
from ptth_lib.forward.limits import (
    LOCAL_CONNECT_TIMEOUT_SECS,
    MAX_ANSWER_BYTES,
    RELAY_CONNECT_TIMEOUT_SECS,
)
from ptth_lib.forward.splice import OpenSplices, Splice, TcpEnd, in_threads
from ptth_lib.wire.envelope import (
    API_KEY_HEADER,
    CLIENT_NAME_HEADER,
    CONNECTION_ID_HEADER,
    TCP_ACCEPT_PATH,
    TCP_DOWNSTREAM_PATH,
    TCP_LISTEN_PATH,
    TCP_REFUSE_PATH,
)
from ptth_lib.wire.names import short_id

logger = logging.getLogger(__name__)

# A tcp_listen parks at the relay for its listen_timeout_secs (at most 300 s).
LISTEN_READ_TIMEOUT_SECS = 330.0
# ...and at least 1 s (config._check_listen_timeout): a 204 sooner than that is the relay
# stopping, or not the relay at all; either way, trying again at once would spin.
MIN_PARKED_SECS = 1.0


class PortForwardServer:
    """Listens at the relay for every forwarded port and serves the connections."""

    def __init__(self, config: ServerConfig, new_session: Callable[[], requests.Session],
                 stop: threading.Event) -> None:
        assert config.api_key is not None
        self.config = config
        self._headers = {API_KEY_HEADER: config.api_key}
        self._base = config.relay_url.rstrip("/")
        self._new_session = new_session
        self._stop = stop
        self._open = OpenSplices()

    def start(self) -> None:
        """One listen thread per forwarded port."""
        for port in self.config.forwarded_ports:
            threading.Thread(target=self._listen_forever, args=(port,), name=f"ptth-tcp-{port}",
                             daemon=True).start()
        if self.config.forwarded_ports:
            logger.info("forwarding ports %s", ", ".join(
                f"{name} -> {host}:{port}" for name, (host, port) in self.config.forwarded_ports.items()))

    def stop(self) -> None:
        """Cut every open forwarded connection (its client sees a reset, not an end)."""
        self._open.abort_all("ptth_server is stopping")

    def _listen_forever(self, port: str) -> None:
        url = self._base + TCP_LISTEN_PATH.format(name=quote(self.config.name, safe=""), port=port)
        session = self._new_session()
        failures = 0
        state = ("", False)  # the last problem and whether it was quiet: each is logged once, not per retry
        while not self._stop.is_set():
            started = time.monotonic()
            problem, quiet = "", False
            try:
                # Never follow a redirect: it would carry our key to wherever it points.
                with session.post(url, headers=self._headers, allow_redirects=False, stream=True,
                                  timeout=(RELAY_CONNECT_TIMEOUT_SECS, LISTEN_READ_TIMEOUT_SECS)) as r:
                    status = r.status_code
                    conn_id = r.headers.get(CONNECTION_ID_HEADER, "")
                    client = r.headers.get(CLIENT_NAME_HEADER, "?")[:64]
                    body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)  # all of it: keep-alive
                    if status not in (200, 204):
                        problem = f"relay answered {describe_answer(status, r.headers, body)}"
            except HTTP_ERRORS as e:
                # The HTTP listen loop reports an unreachable relay; this one only retries.
                status, problem, quiet = 0, f"cannot reach the relay: {root_cause(e)}", True
            if status == 200 and conn_id:
                threading.Thread(target=self._serve, args=(port, conn_id, client), daemon=True,
                                 name=f"ptth-tcp-{port}-{short_id(conn_id)}").start()
            elif status == 200:
                problem = "relay answered 200 without a connection id"
            elif status == 403:
                quiet = True  # the HTTP listen loop says it, and stops the server
            state = self._report(port, (problem, quiet), state)
            if (status == 200 and conn_id) or (status == 204 and time.monotonic() - started >= MIN_PARKED_SECS):
                failures = 0
                continue
            # Anything else, and a 204 that came at once (the relay parks a listen for at least
            # MIN_PARKED_SECS, unless it is stopping), waits before the next try.
            delay = backoff_secs(failures)
            failures = min(failures + 1, 16)
            self._stop.wait(delay)

    @staticmethod
    def _report(port: str, new: tuple[str, bool], old: tuple[str, bool]) -> tuple[str, bool]:
        """Log a change of one listen's state (problem, quiet) once, not once per retry; return it.

        A quiet problem (the relay unreachable, or refusing our key) is the HTTP
        listen loop's to report; this one logs it, and the recovery, at DEBUG only.
        """
        (problem, quiet), (was, was_quiet) = new, old
        if problem == was:
            return old
        if problem:
            logger.log(logging.DEBUG if quiet else logging.WARNING,
                       "tcp listen for port %s: %s; retrying with backoff", port, problem)
        else:
            logger.log(logging.DEBUG if was_quiet else logging.INFO, "tcp listen for port %s: listening again",
                       port)
        return new

    def _serve(self, port: str, conn_id: str, client: str) -> None:
        """One connection: connect locally, accept (or refuse), then splice until it ends."""
        host, number = self.config.forwarded_ports[port]
        label = f"{short_id(conn_id)} from client {client} to {port} ({host}:{number})"
        try:
            sock = socket.create_connection((host, number), timeout=LOCAL_CONNECT_TIMEOUT_SECS)
        except OSError as e:
            reason = f"cannot connect to port {port}: {e.strerror or e}"
            logger.warning("connection %s refused: %s", label, reason)
            self._post_refusal(conn_id, reason)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._new_session() as session:
            session.proxies.clear()  # straight to the relay, as the downstream POST goes
            try:
                r = session.post(self._url(TCP_ACCEPT_PATH, conn_id), headers=self._headers, stream=True,
                                 allow_redirects=False, timeout=(RELAY_CONNECT_TIMEOUT_SECS, None))
            except HTTP_ERRORS as e:
                logger.warning("connection %s: accept failed: %s", label, root_cause(e))
                sock.close()
                return
            with r:
                if r.status_code != 200:
                    body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
                    logger.warning("connection %s: relay answered %s to accept", label,
                                   describe_answer(r.status_code, r.headers, body))
                    sock.close()
                    return
                logger.info("connection %s open", label)
                streams = RelayStreams(r, self._url(TCP_DOWNSTREAM_PATH, conn_id),
                                       {**self._headers, "User-Agent": f"ptth_server/{__version__}"})
                splice = Splice(TcpEnd(sock, watch=streams.check), streams, in_threads)
                with self._open.running(splice):
                    reason = splice.run()
        logger.info("connection %s closed%s: %d bytes in, %d out", label, f" ({reason})" if reason else "",
                    splice.b_to_a, splice.a_to_b)

    def _post_refusal(self, conn_id: str, reason: str) -> None:
        try:
            with self._new_session() as session, session.post(
                    self._url(TCP_REFUSE_PATH, conn_id), data=reason.encode("utf-8"), headers=self._headers,
                    allow_redirects=False, stream=True, timeout=RELAY_CONNECT_TIMEOUT_SECS) as r:
                if r.status_code != 200:
                    body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
                    logger.info("the relay answered %s to the refusal",
                                describe_answer(r.status_code, r.headers, body))
        except HTTP_ERRORS as e:
            logger.info("could not tell the relay about the refusal: %s", root_cause(e))

    def _url(self, template: str, conn_id: str) -> str:
        return self._base + template.format(id=quote(conn_id, safe=""))
