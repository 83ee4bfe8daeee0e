"""ptth_server's side of TCP port forwarding (spec 003): the server-side proxy.

For each name in the config's `[forwarded_ports]` one thread long-polls the
relay (`tcp_listen`). When a client connects, the relay answers with a
connection id; a new thread connects to that port's local address (and to no
other: the relay only ever names a port, never an address), then accepts the
connection (`tcp_accept`, whose response body is the client's bytes) and
POSTs the local server's bytes back (`tcp_downstream`), via `tcp_splice`. If
the local address does not answer, it refuses (`tcp_refuse`), and the client
gets a 502 with the reason.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from urllib.parse import quote

import requests

from . import __version__
from .config import ServerConfig
from .errors import backoff_secs, root_cause
from .protocol import (
    API_KEY_HEADER,
    CLIENT_NAME_HEADER,
    CONNECTION_ID_HEADER,
    TCP_ACCEPT_PATH,
    TCP_DOWNSTREAM_PATH,
    TCP_LISTEN_PATH,
    TCP_REFUSE_PATH,
)
from .tcp_splice import HTTP_ERRORS, Splice

logger = logging.getLogger(__name__)

# Connecting to the local TCP server; the relay gives us 10 s to accept or refuse.
LOCAL_CONNECT_TIMEOUT_SECS = 5.0
CONNECT_TIMEOUT_SECS = 10.0
# A tcp_listen parks at the relay for its listen_timeout_secs (at most 300 s).
LISTEN_READ_TIMEOUT_SECS = 330.0


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
        self._open: set[Splice] = set()
        self._lock = threading.Lock()

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
        with self._lock:
            splices = list(self._open)
        for splice in splices:
            splice.abort("ptth_server is stopping")

    def _listen_forever(self, port: str) -> None:
        url = self._base + TCP_LISTEN_PATH.format(name=quote(self.config.name, safe=""), port=port)
        session = self._new_session()
        failures = 0
        while not self._stop.is_set():
            try:
                with session.post(url, headers=self._headers,
                                  timeout=(CONNECT_TIMEOUT_SECS, LISTEN_READ_TIMEOUT_SECS)) as r:
                    status = r.status_code
                    conn_id = r.headers.get(CONNECTION_ID_HEADER, "")
                    client = r.headers.get(CLIENT_NAME_HEADER, "?")[:64]
            except HTTP_ERRORS as e:
                # The HTTP listen loop reports an unreachable relay; this one only retries.
                logger.debug("tcp listen for port %s failed: %s", port, root_cause(e))
                status, conn_id, client = 0, "", ""
            if status == 200 and conn_id:
                failures = 0
                threading.Thread(target=self._serve, args=(port, conn_id, client), daemon=True,
                                 name=f"ptth-tcp-{port}-{conn_id[:8]}").start()
                continue
            if status == 204:
                failures = 0
                continue
            if status == 403:
                logger.debug("relay refused the tcp listen for port %s (see the listen loop)", port)
            elif status:
                logger.warning("tcp listen for port %s: relay answered %d", port, status)
            delay = backoff_secs(failures)
            failures = min(failures + 1, 16)
            self._stop.wait(delay)

    def _serve(self, port: str, conn_id: str, client: str) -> None:
        """One connection: connect locally, accept (or refuse), then splice until it ends."""
        host, number = self.config.forwarded_ports[port]
        label = f"{conn_id[:8]} from client {client} to {port} ({host}:{number})"
        try:
            sock = socket.create_connection((host, number), timeout=LOCAL_CONNECT_TIMEOUT_SECS)
        except OSError as e:
            reason = f"cannot connect to port {port}: {e.strerror or e}"
            logger.warning("connection %s refused: %s", label, reason)
            self._post_refusal(conn_id, reason)
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accept_session = self._new_session()
        accept_session.proxies.clear()  # straight to the relay, as the downstream POST goes (tcp_splice)
        try:
            r = accept_session.post(self._url(TCP_ACCEPT_PATH, conn_id), headers=self._headers, stream=True,
                                    timeout=(CONNECT_TIMEOUT_SECS, None))
        except HTTP_ERRORS as e:
            logger.warning("connection %s: accept failed: %s", label, root_cause(e))
            sock.close()
            return
        with r:
            if r.status_code != 200:
                logger.warning("connection %s: relay answered %d to accept", label, r.status_code)
                sock.close()
                return
            logger.info("connection %s open", label)
            splice = Splice(sock, label)
            with self._lock:
                self._open.add(splice)

            try:
                splice.run(r, self._url(TCP_DOWNSTREAM_PATH, conn_id),
                           {**self._headers, "User-Agent": f"ptth_server/{__version__}"})
            finally:
                with self._lock:
                    self._open.discard(splice)
                accept_session.close()
        logger.info("connection %s closed%s: %d bytes in, %d out", label,
                    f" ({splice.reason})" if splice.aborted else "", splice.bytes_in, splice.bytes_out)

    def _post_refusal(self, conn_id: str, reason: str) -> None:
        try:
            with self._new_session() as session:
                session.post(self._url(TCP_REFUSE_PATH, conn_id), data=reason.encode("utf-8"),
                             headers=self._headers, timeout=CONNECT_TIMEOUT_SECS).close()
        except HTTP_ERRORS as e:
            logger.info("could not tell the relay about the refusal: %s", root_cause(e))

    def _url(self, template: str, conn_id: str) -> str:
        return self._base + template.format(id=quote(conn_id, safe=""))
