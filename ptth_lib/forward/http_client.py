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
from typing import TypeVar
from urllib.parse import quote

import requests

from ptth_lib import __version__
from ptth_lib.config import ClientConfig, Forward
from ptth_lib.errors import backoff_secs, describe_answer, root_cause
from ptth_lib.forward.client import ClientError, ForwardTally, RelayState, is_allowed
from ptth_lib.forward.http_streams import HTTP_ERRORS, RelayStreams
from ptth_lib.forward.limits import MAX_ANSWER_BYTES, RELAY_CONNECT_TIMEOUT_SECS
from ptth_lib.forward.splice import Splice, TcpEnd, in_threads, reset
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

# In the desktop app, how often the relay is asked again while it answers (after a failure: backoff, up
# to this): a window that says "connected" is at most this stale, for one small POST per interval.
RECHECK_SECS = 10.0

T = TypeVar("T")


class HttpClientProxy:
    """ptth_client's connections through the HTTP relay, one thread each."""

    socket_class = socket.socket
    fatal = ""  # over HTTP nothing is final: each connection asks the relay again

    def __init__(self, config: ClientConfig, background: bool = False) -> None:
        assert config.relay_url is not None
        self.config = config
        self.relay = config.relay_url
        self._base = config.relay_url.rstrip("/")
        self._headers = {API_KEY_HEADER: config.api_key, "User-Agent": f"ptth_client/{__version__}"}
        self._stop = threading.Event()
        self._background = background
        self._state = RelayState(None)
        self._last_good: RelayState | None = None  # the last check that passed: who the relay says we are

    def connect(self) -> None:
        """In the background, check the relay now and then, so that a window can show whether it is up."""
        if self._background:
            self.spawn(self._keep_checking, "ptth-client-check")

    def relay_state(self) -> RelayState:
        return self._state

    def _keep_checking(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.check()
                failures = 0
                delay = RECHECK_SECS
            except ClientError:
                delay = min(backoff_secs(failures), RECHECK_SECS)
                failures = min(failures + 1, 16)
            self._stop.wait(delay)

    def _note(self, state: RelayState) -> None:
        """Log a change of the relay's state, once."""
        if self._background and state.connected is False and state.problem != self._state.problem:
            logger.warning("%s", state.problem)
        self._state = state

    def check(self) -> str:
        """Ask the relay who our key is; return the client name. ClientError if it cannot say."""
        try:
            name, allowed = self._check()
        except ClientError as e:
            self._note(RelayState(False, str(e)))
            raise
        if not self._state.connected:
            logger.info("connected to relay %s as client %r", self.relay, name)
            for f in self.config.forwards:
                if not is_allowed(allowed, f):
                    logger.warning("the relay does not allow this client to reach %s:%s (local port %d)",
                                   f.server, f.port, f.local_port)
        self._last_good = RelayState(True, "", name, allowed)
        self._note(self._last_good)
        return name

    def _check(self) -> tuple[str, frozenset[str]]:
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
        allow = answer.get("allow", [])
        return str(answer.get("client", "?")), frozenset(str(a) for a in allow if isinstance(allow, list))

    @staticmethod
    def spawn(target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, daemon=True, name=name).start()

    def pause(self, secs: float) -> None:
        self._stop.wait(secs)

    @staticmethod
    def call(fn: Callable[[], T]) -> T:
        return fn()

    def wait_for_signal(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def serve(self, sock: socket.socket, peer: tuple[str, int], forward: Forward, tally: ForwardTally) -> None:
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
                problem = f"cannot reach the relay at {self.relay}: {root_cause(e)}"
                logger.warning("connection %s failed: %s", label, problem)
                self._note(RelayState(False, problem))
                tally.refused(problem)
                reset(sock)
                return
            with r:
                if r.status_code != 200:
                    body = r.raw.read(MAX_ANSWER_BYTES, decode_content=True)
                    problem = describe_answer(r.status_code, r.headers, body)
                    logger.warning("connection %s refused: %s", label, problem)
                    tally.refused(f"refused: {problem}")
                    reset(sock)
                    return
                if self._last_good is not None and not self._state.connected:
                    self._note(self._last_good)  # the relay answers again: no need to wait for the next check
                conn_id = r.headers.get(CONNECTION_ID_HEADER, "")
                label = f"{short_id(conn_id)} {label}"
                logger.info("connection %s open", label)
                upstream_url = self._base + TCP_UPSTREAM_PATH.format(id=quote(conn_id, safe=""))
                streams = RelayStreams(r, upstream_url, self._headers)
                splice = Splice(TcpEnd(sock, watch=streams.check), streams, in_threads)
                with tally.running(splice):
                    reason = splice.run()
            logger.info("connection %s closed%s: %d bytes up, %d down", label, f" ({reason})" if reason else "",
                        splice.a_to_b, splice.b_to_a)
        finally:
            connect_session.close()
