"""ptth_client over HTTP (spec 003): the client-side proxy's calls to the relay.

At start-up `check` asks the relay who the client's key is and warns about
forwards it does not allow. Then each TCP connection accepted on a local port
(client.py) gets a thread that asks the relay to connect it (`connect`,
whose response body is the server's bytes once the server has accepted) and
POSTs the TCP client's bytes (`upstream`), spliced with the TCP socket in two
threads. If the relay or the server refuses, the TCP connection is reset and
the reason logged.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from collections.abc import Callable
from urllib.parse import quote

import requests

from ptth_lib import __version__
from ptth_lib.config import ClientConfig, Forward
from ptth_lib.errors import describe_answer, root_cause
from ptth_lib.forward.client import ClientError
from ptth_lib.forward.http_streams import HTTP_ERRORS, RelayStreams
from ptth_lib.forward.limits import MAX_ANSWER_BYTES, RELAY_CONNECT_TIMEOUT_SECS
from ptth_lib.forward.splice import OpenSplices, Splice, TcpEnd, in_threads, reset
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    API_KEY_HEADER,
    CONNECTION_ID_HEADER,
    TCP_CHECK_PATH,
    TCP_CONNECT_PATH,
    TCP_UPSTREAM_PATH,
)
from ptth_lib.wire.names import short_id

logger = logging.getLogger(__name__)


class HttpClientProxy:
    """ptth_client's connections through the HTTP relay, one thread each."""

    socket_class = socket.socket

    def __init__(self, config: ClientConfig) -> None:
        assert config.relay_url is not None
        self.config = config
        self.relay = config.relay_url
        self._base = config.relay_url.rstrip("/")
        self._headers = {API_KEY_HEADER: config.api_key, "User-Agent": f"ptth_client/{__version__}"}
        self._stop = threading.Event()
        self._open = OpenSplices()

    def check(self) -> str:
        """Ask the relay who our key is; return the client name. ClientError if it cannot say."""
        try:
            # Never follow a redirect: it would carry our key to wherever it points.
            with requests.post(self._base + TCP_CHECK_PATH, headers=self._headers, stream=True,
                               allow_redirects=False,
                               timeout=(RELAY_CONNECT_TIMEOUT_SECS, RELAY_CONNECT_TIMEOUT_SECS)) as r:
                status, headers = r.status_code, r.headers
                body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
        except HTTP_ERRORS as e:
            raise ClientError(f"cannot reach the relay at {self.relay}: {root_cause(e)}") from None
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
            raise ClientError(f"the relay at {self.relay} answered "
                              f"{describe_answer(status, headers, body)} to the key check")
        allowed = set(answer.get("allow", []))
        for f in self.config.forwards:
            if f"{f.server}:{f.port}" not in allowed and f"{f.server}:*" not in allowed:
                logger.warning("the relay does not allow this client to reach %s:%s (local port %d)",
                               f.server, f.port, f.local_port)
        name = str(answer.get("client", "?"))
        logger.info("connected to relay %s as client %r", self.relay, name)
        return name

    @staticmethod
    def spawn(target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, daemon=True, name=name).start()

    def pause(self, secs: float) -> None:
        self._stop.wait(secs)

    def run_until_stopped(self, close_ports: Callable[[], None]) -> int:
        """Serve until SIGTERM or SIGINT; then close the ports and cut open connections."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        self._stop.wait()
        close_ports()
        self._open.abort_all("ptth_client is stopping")
        return 0

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def serve(self, sock: socket.socket, peer: tuple[str, int], forward: Forward) -> None:
        """One TCP connection: ask the relay to connect it, then splice until it ends."""
        label = f"{peer[0]}:{peer[1]} -> {forward.server}:{forward.port}"
        connect_session = requests.Session()
        connect_session.trust_env = False  # straight to the relay, as the upstream POST goes
        connect_session.headers.update(self._headers)
        try:
            url = self._base + TCP_CONNECT_PATH.format(server=quote(forward.server, safe=""),
                                                       port=quote(forward.port, safe=""))
            try:
                # No read timeout: the relay answers within 20 s (forwarding.OFFER_WAIT_SECS plus
                # DECIDE_WAIT_SECS), and then the body may be quiet for hours (an idle SSH session).
                r = connect_session.post(url, stream=True, allow_redirects=False,
                                         timeout=(RELAY_CONNECT_TIMEOUT_SECS, None))
            except HTTP_ERRORS as e:
                logger.warning("connection %s failed: cannot reach the relay: %s", label, root_cause(e))
                reset(sock)
                return
            with r:
                if r.status_code != 200:
                    body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
                    logger.warning("connection %s refused: %s", label,
                                   describe_answer(r.status_code, r.headers, body))
                    reset(sock)
                    return
                conn_id = r.headers.get(CONNECTION_ID_HEADER, "")
                label = f"{short_id(conn_id)} {label}"
                logger.info("connection %s open", label)
                upstream_url = self._base + TCP_UPSTREAM_PATH.format(id=quote(conn_id, safe=""))
                streams = RelayStreams(r, upstream_url, self._headers)
                splice = Splice(TcpEnd(sock, watch=streams.check), streams, in_threads)
                with self._open.running(splice):
                    reason = splice.run()
            logger.info("connection %s closed%s: %d bytes up, %d down", label, f" ({reason})" if reason else "",
                        splice.a_to_b, splice.b_to_a)
        finally:
            connect_session.close()
