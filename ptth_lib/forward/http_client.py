"""ptth_client: the client-side proxy of TCP port forwarding (spec 003).

Binds one local TCP port per forward (LOCALPORT:SERVER:PORTNAME). Each TCP
connection accepted there gets a thread that asks the relay to connect it
(`connect`, whose response body is the server's bytes once the server has
accepted) and POSTs the TCP client's bytes (`upstream`), via `tcp_splice`.
If the relay or the server refuses, the TCP connection is reset and the
reason logged. Any number of connections per port, each independent.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from urllib.parse import quote

import requests

from ptth_lib import __version__
from ptth_lib.config import ClientConfig, Forward
from ptth_lib.errors import PtthError, describe_answer, root_cause
from ptth_lib.forward.splice import HTTP_ERRORS, Splice
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    API_KEY_HEADER,
    CONNECTION_ID_HEADER,
    TCP_CHECK_PATH,
    TCP_CONNECT_PATH,
    TCP_UPSTREAM_PATH,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECS = 10.0
# The relay's answers to the key check and its refusals are a short JSON object or one line of
# text; more than this is not read.
MAX_ANSWER_BYTES = 4096
ACCEPT_BACKLOG = 128


class ClientError(PtthError):
    """A start-up problem worth one line and a non-zero exit: a busy port, a refused key."""


class PortForwardClient:
    """Every local port of one ptth_client, and the connections through them."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._base = config.relay_url.rstrip("/")
        self._headers = {API_KEY_HEADER: config.api_key, "User-Agent": f"ptth_client/{__version__}"}
        self._stop = threading.Event()
        self._listeners: list[tuple[socket.socket, Forward]] = []
        self._open: set[Splice] = set()
        self._lock = threading.Lock()

    def check_relay(self) -> str:
        """Ask the relay who our key is; return the client name. ClientError if it cannot say."""
        try:
            # Never follow a redirect: it would carry our key to wherever it points.
            with requests.post(self._base + TCP_CHECK_PATH, headers=self._headers, stream=True,
                               allow_redirects=False,
                               timeout=(CONNECT_TIMEOUT_SECS, CONNECT_TIMEOUT_SECS)) as r:
                status, headers = r.status_code, r.headers
                body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
        except HTTP_ERRORS as e:
            raise ClientError(f"cannot reach the relay at {self.config.relay_url}: {root_cause(e)}") from None
        is_json = headers.get("Content-Type", "").partition(";")[0].strip() == "application/json"
        try:
            answer = json.loads(body) if status == 200 and is_json else None
        except ValueError:
            answer = None
        is_text = headers.get("Content-Type", "").startswith("text/plain")
        if status == 403 and is_text:
            raise ClientError(f"the relay does not know this client's key: add a [[clients]] table with "
                              f"tripcode = \"{tripcode.derive(self.config.api_key)}\" to the relay config")
        if not isinstance(answer, dict):
            raise ClientError(f"the relay at {self.config.relay_url} answered "
                              f"{describe_answer(status, headers, body)} to the key check")
        allowed = set(answer.get("allow", []))
        for f in self.config.forwards:
            if f"{f.server}:{f.port}" not in allowed and f"{f.server}:*" not in allowed:
                logger.warning("the relay does not allow this client to reach %s:%s (local port %d)",
                               f.server, f.port, f.local_port)
        return str(answer.get("client", "?"))

    def bind(self) -> None:
        """Bind every local port now, so a busy port is an error at start-up."""
        for f in self.config.forwards:
            try:
                sock = socket.create_server((self.config.bind, f.local_port), backlog=ACCEPT_BACKLOG)
            except OSError as e:
                for other, _ in self._listeners:
                    other.close()
                raise ClientError(f"cannot listen on {self.config.bind}:{f.local_port}: "
                                  f"{e.strerror or e}") from None
            self._listeners.append((sock, f))

    def run(self) -> None:
        """Accept connections on every bound port until stop()."""
        for sock, f in self._listeners:
            threading.Thread(target=self._accept_forever, args=(sock, f), daemon=True,
                             name=f"ptth-client-{f.local_port}").start()
            logger.info("forwarding %s:%d to %s:%s", self.config.bind, sock.getsockname()[1], f.server, f.port)
        self._stop.wait()
        for sock, _ in self._listeners:
            sock.close()
        with self._lock:
            splices = list(self._open)
        for splice in splices:
            splice.abort("ptth_client is stopping")

    def stop(self) -> None:
        """Stop accepting and cut open connections (safe from a signal handler)."""
        self._stop.set()

    def _accept_forever(self, listener: socket.socket, forward: Forward) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = listener.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                logger.warning("accept on port %d failed: %s", forward.local_port, e.strerror or e)
                self._stop.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            threading.Thread(target=self._serve, args=(sock, peer, forward), daemon=True,
                             name=f"ptth-client-{forward.local_port}-{peer[1]}").start()

    def _serve(self, sock: socket.socket, peer: tuple[str, int], forward: Forward) -> None:
        """One TCP connection: ask the relay to connect it, then splice until it ends."""
        label = f"{peer[0]}:{peer[1]} -> {forward.server}:{forward.port}"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect_session = requests.Session()
        connect_session.trust_env = False  # straight to the relay, as the upstream POST goes (tcp_splice)
        connect_session.headers.update(self._headers)
        try:
            url = self._base + TCP_CONNECT_PATH.format(server=quote(forward.server, safe=""),
                                                       port=quote(forward.port, safe=""))
            try:
                # No read timeout: the relay answers within 20 s (forwarding.OFFER_WAIT_SECS plus
                # DECIDE_WAIT_SECS), and then the body may be quiet for hours (an idle SSH session).
                r = connect_session.post(url, stream=True, allow_redirects=False,
                                         timeout=(CONNECT_TIMEOUT_SECS, None))
            except HTTP_ERRORS as e:
                logger.warning("connection %s failed: cannot reach the relay: %s", label, root_cause(e))
                _reset(sock)
                return
            with r:
                if r.status_code != 200:
                    body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
                    logger.warning("connection %s refused: %s", label,
                                   describe_answer(r.status_code, r.headers, body))
                    _reset(sock)
                    return
                conn_id = r.headers.get(CONNECTION_ID_HEADER, "")
                label = f"{conn_id[:8]} {label}"
                logger.info("connection %s open", label)
                splice = Splice(sock, label)
                with self._lock:
                    self._open.add(splice)
                upstream_url = self._base + TCP_UPSTREAM_PATH.format(id=quote(conn_id, safe=""))
                try:
                    splice.run(r, upstream_url, self._headers)
                finally:
                    with self._lock:
                        self._open.discard(splice)
            logger.info("connection %s closed%s: %d bytes up, %d down", label,
                        f" ({splice.reason})" if splice.aborted else "", splice.bytes_out, splice.bytes_in)
        finally:
            connect_session.close()


def _reset(sock: socket.socket) -> None:
    """Close with a reset: the TCP client sees a refused connection, not an empty answer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
