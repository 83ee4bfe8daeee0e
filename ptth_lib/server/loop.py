"""The server side of the tunnel: long-poll the relay, answer with streamed POSTs.

Listen threads, each on its own `requests.Session`, ask the relay for
requests (P1), get them packed in the answer (P3), and hand each to a thread
pool. A pool thread answers each (P4, P5, P7: responder.py).

PTTH's own additions to the listen (PROTOCOL.md): each listen acknowledges
the batch the previous one brought (so the relay hands each request out
exactly once, whatever the connections do), asks for no more requests than
the pool has room for (so nothing queues here without bound), and the first
listen after connecting asks for an answer at once (so "connected" is logged
at once, not after a long-poll). A stopping server tells the relay it is
leaving. An upload stops as soon as the relay answers it early (the client
left), even through a proxy that keeps reading the rest.

Faults are expected: connection errors back off exponentially with jitter and
are logged once per change of state, except the cuts of NAT boxes and proxies
that close idle connections (a listen cut while parked, a kept-alive
connection closed in the instant it is reused), after which it listens again
at once; so do unexpected answers (a redirect is
never followed: the key would go to wherever it points). A 403 from the relay
stops the loop, because retrying with a key the relay refuses cannot succeed.

When the config has `[forwarded_ports]`, TCP port forwarding runs beside the
listen loop (forward_server.py) and stops with it.

With `web_app_url`, listens also announce `bodies` and `websocket` (PROTOCOL.md
"Web apps"), and the relay's own features, in its answers, are kept for the
responder (a relay with `header-lists` gets repeated headers as lists). A
WebSocket leaves the pool once the app has said 101: it runs in threads of
its own, at most web_app.MAX_WEBSOCKETS, so idle ones never hold the pool's
room (MAX_CONCURRENT_REQUESTS bounds requests being answered).
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from urllib.parse import quote

import requests
import urllib3

from ptth_lib import __version__
from ptth_lib.config import ServerConfig
from ptth_lib.errors import (
    ProtocolError,
    backoff_secs,
    describe_answer,
    retry_after_secs,
    root_cause,
)
from ptth_lib.forward.http_server import PortForwardServer
from ptth_lib.requests_adapter import closed_when_reused, exchange, new_session
from ptth_lib.server.answers import AnswerCarrier
from ptth_lib.server.responder import Responder
from ptth_lib.server.spare_listens import SpareListens
from ptth_lib.wire import tripcode
from ptth_lib.wire.envelope import (
    ACK_HEADER,
    API_KEY_HEADER,
    BATCH_HEADER,
    FEATURE_ACK,
    FEATURE_ANSWERS,
    FEATURE_BODIES,
    FEATURE_WEBSOCKET,
    FEATURES_HEADER,
    LEAVE_PATH,
    LISTEN_PATH,
    MAX_LISTEN_BODY_BYTES,
    MAX_REQUESTS_HEADER,
    NODE_HEADER,
    SERVER_HOST_HEADER,
    SERVER_VERSION_HEADER,
    WAIT_HEADER,
    InlineAnswer,
    RelayRequest,
    decode_requests,
    encode_answers,
    is_request_id,
    parse_features,
)

logger = logging.getLogger(__name__)

# Requests served at once; more wait in the pool's queue. Each one holds a file
# and a connection to the relay until its client has the whole body (P7), so
# this bounds both, and also how many clients are served in parallel.
MAX_CONCURRENT_REQUESTS = 64
# Requests taken from the relay and waiting for a pool thread, at most. Past
# this the server stops asking for more, and they wait at the relay instead,
# where the relay's queue bound (and its 503) applies.
MAX_BACKLOG_REQUESTS = 64

# A server with no room for more requests still tells the relay it is there
# this often (a listen asking for none), or the relay would count it gone and
# fail the requests queued for it.
AT_CAPACITY_POLL_SECS = 1.0

# Listens kept parked at the relay at once. With two, a request arriving while
# one listen is on its way back still finds the other parked, instead of
# waiting a round trip for the re-poll.
LISTENS_IN_FLIGHT = 2


CONNECT_TIMEOUT_SECS = 10.0
# A listen that fails after this long had been parked at the relay, so the
# relay was up: the connection was cut on the way (see _listen_forever). A
# listen asked to park that is answered 204 sooner was ended early: once, by
# the relay because another process of this server left (listen again at once);
# twice in a row, by something that answers at once (a stopping relay, a
# misbehaving proxy), so back off.
PARKED_CUT_SECS = 1.0
# A listen parks at the relay for its listen_timeout_secs (at most 300 s).
LISTEN_READ_TIMEOUT_SECS = 330.0
# On Ctrl+C / SIGTERM, responses in flight get this long to finish...
SHUTDOWN_GRACE_SECS = 10.0
# ...after telling the relay we are leaving, which may take this long.
LEAVE_TIMEOUT_SECS = 5.0
# ...and the QUIC side this long to close its connection to the relay.
QUIC_STOP_SECS = 2.0


class ServerLoop:
    """Keeps one server connected to its relay and answers its requests."""

    def __init__(self, config: ServerConfig) -> None:
        assert config.api_key is not None
        self.config = config
        self._api_key: str = config.api_key
        base = config.relay_url.rstrip("/")
        self._listen_url = base + LISTEN_PATH.format(name=quote(config.name, safe=""))
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._leave_url = base + LEAVE_PATH.format(name=quote(config.name, safe=""))
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="ptth-response")
        self._proxies = requests.utils.get_environ_proxies(base)
        self._in_flight: set[Future[None]] = set()
        self._lock = threading.Lock()
        # Requests taken or being asked for (reserved by a listen), against the pool's room.
        self._reserved = 0
        self._room = threading.Condition(self._lock)
        self.exit_code = 0
        self._state = ""  # "connected" or the last problem, for _report
        self._forwarding = PortForwardServer(config, self._new_session, self._stop)
        self._responder = Responder(config, self._new_session, self._abort, MAX_CONCURRENT_REQUESTS)
        self._spare = SpareListens(self._stop)  # listens beyond the first rest while idle
        self._features = FEATURE_ACK
        if config.web_app_url is not None:
            self._features = f"{FEATURE_ACK}, {FEATURE_BODIES}, {FEATURE_WEBSOCKET}"
            _raise_open_files_limit()

    # ---- lifecycle ------------------------------------------------------

    def run(self) -> int:
        """Listen until `stop()` or a refusal from the relay; return the exit code."""
        listeners = [threading.Thread(target=self._listen_forever, args=(i,), name=f"ptth-listen-{i}", daemon=True)
                     for i in range(LISTENS_IN_FLIGHT)]
        for listener in listeners:
            listener.start()
        self._forwarding.start()
        quic_stop: list[Callable[[], None]] = []
        quic_thread = None
        if self.config.quic is not None:
            quic_thread = threading.Thread(target=_run_quic_end_server, args=(self.config, quic_stop,
                                                                              self._quic_refused),
                                           name="ptth-quic", daemon=True)
            quic_thread.start()
        self._stop.wait()
        if self.exit_code == 0:
            logger.info("stopping: telling the relay, then letting responses in flight finish")
            self._leave()
        if quic_thread is not None and quic_stop:
            quic_stop[0]()  # close the QUIC connection: its streams and TCP connections are cut
            quic_thread.join(QUIC_STOP_SECS)
        self._forwarding.stop()
        if self._responder.web_app is not None:
            self._responder.web_app.stop()
        with self._lock:
            running = set(self._in_flight)
        if running:
            logger.info("stopping: waiting up to %.0f s for %d responses", SHUTDOWN_GRACE_SECS, len(running))
            _, not_done = wait(running, timeout=SHUTDOWN_GRACE_SECS)
            if not_done:
                logger.warning("stopping: abandoning %d unfinished responses", len(not_done))
                self._abort.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # The relay ended their parked listens (leave): each POSTs the answers it gathered, if any.
        deadline = time.monotonic() + LEAVE_TIMEOUT_SECS
        for listener in listeners:
            listener.join(max(0.0, deadline - time.monotonic()))
        logger.info("stopped")
        return self.exit_code

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self._stop.set()

    # ---- P1/P3: the listen loop ----------------------------------------

    def _listen_forever(self, index: int = 0) -> None:
        session = self._new_session()
        session.headers.update({
            API_KEY_HEADER: self._api_key,
            "User-Agent": f"ptth_server/{__version__}",
            SERVER_VERSION_HEADER: f"ptth_server/{__version__} (Python)",
            SERVER_HOST_HEADER: socket.gethostname(),
            FEATURES_HEADER: self._features,
        })
        failures = 0
        ack = ""        # the batch the last answer brought, acknowledged by the next listen
        at_once = True  # the first listen after (re)connecting is answered at once
        carrier: AnswerCarrier | None = None  # gathers the last batch's small answers (answers.py)
        answers: list[InlineAnswer] = []  # what the next listen carries
        tries = 0  # listens that tried to carry these answers
        ended_early = False  # the last listen, asked to wait, was answered 204 at once
        while not self._stop.is_set():
            problem = ""
            asked_secs = 0.0  # the relay's Retry-After, when it refuses
            parked_out = False  # parked the whole listen timeout: nothing came (spare_listens.py)
            room = self._reserve()
            if self._stop.is_set():
                self._unreserve(room)
                break
            if carrier is not None:
                answers, carrier, tries = carrier.take(), None, 0
            headers = {MAX_REQUESTS_HEADER: str(room)}
            if ack:
                headers[ACK_HEADER] = ack
            body = None
            if answers:
                body = encode_answers(answers)
                headers["Content-Type"] = "application/msgpack"
                tries += 1
            if at_once or room == 0:
                # At capacity: still listen, taking nothing and answered at once, so
                # the relay keeps counting this server online (and requests queued).
                headers[WAIT_HEADER] = "0"
            taken = 0
            started = time.monotonic()
            try:
                # Read at most one byte past the limit: a hostile relay cannot make us read more.
                r = exchange(session, "POST" if body else "GET", self._listen_url, headers,
                             (CONNECT_TIMEOUT_SECS, LISTEN_READ_TIMEOUT_SECS), MAX_LISTEN_BODY_BYTES + 1, body)
                data = r.body
                ack = ""  # the relay answered, so it has read our acknowledgement (and answers)
                answers = []
                if r.status in (200, 204):
                    self._responder.relay_features = parse_features(r.headers.get(FEATURES_HEADER))
                if r.status == 200:
                    ended_early = False
                    batch = decode_requests(data)  # a relay may ignore our limit: serve them all
                    ack = r.headers.get(BATCH_HEADER, "") if is_request_id(r.headers.get(BATCH_HEADER, "")) else ""
                    if FEATURE_ANSWERS in self._responder.relay_features:
                        carrier = AnswerCarrier((req.id for req in batch), r.headers.get(NODE_HEADER, ""))
                    self._spare.work_came()
                    taken = self._dispatch(batch, carrier)
                elif r.status == 403:
                    self._refused()
                    return
                elif r.status == 204:
                    if not at_once and room and time.monotonic() - started < PARKED_CUT_SECS:
                        # Answered at once when asked to wait. Once is normal: another process of
                        # this server left, and the relay ended every listen parked under its name.
                        # Twice in a row, something answers every listen so (a stopping relay, a
                        # misbehaving proxy): back off, say nothing.
                        if ended_early:
                            problem = "quiet"
                        ended_early = True
                    else:
                        ended_early = False
                        parked_out = not at_once and room > 0
                else:
                    problem = f"relay answered {describe_answer(r.status, r.headers, data)} to the listen"
                    asked_secs = retry_after_secs(r.headers)  # a relay that is full says when to come back
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                if not at_once and time.monotonic() - started >= PARKED_CUT_SECS:
                    # The listen was parked, then cut: a NAT box or proxy dropping an idle
                    # connection, not a relay that is down. Reconnect at once, no backoff.
                    logger.debug("listen cut after %.1f s: %s; listening again", time.monotonic() - started,
                                 root_cause(e))
                    failures = 0
                    answers = []  # the relay had them: it delivers before it parks a listen
                    continue
                if closed_when_reused(e):
                    # Cut in the instant it was reused (requests_adapter.closed_when_reused):
                    # the relay never saw this listen. A new connection, at once.
                    logger.debug("listen's kept-alive connection ended unanswered: %s; listening again",
                                 root_cause(e))
                    failures = 0
                    continue
                problem = f"cannot reach the relay at {self.config.relay_url}: {root_cause(e)}"
            except ProtocolError as e:
                problem = f"relay sent a malformed listen answer: {e}"
            except Exception:  # a bug of ours: say so loudly, but keep the server up
                logger.exception("bug in the listen loop")
                problem = "internal error (see above)"
            finally:
                self._unreserve(room - taken)
                if answers and tries >= 2:  # carried twice in vain: the relay is down, or they are too late
                    logger.warning("%d answers not delivered: the relay did not take the listens that carried "
                                   "them", len(answers))
                    answers = []
            if problem != "quiet":
                self._report(problem)
            if not problem:
                failures = 0
                at_once = False
                if parked_out:
                    self._spare.rest_if_idle(index)
                continue
            at_once = problem != "quiet"  # after a real problem, check the connection at once again
            delay = backoff_secs(failures, asked_secs)
            failures = min(failures + 1, 16)
            self._stop.wait(delay)
        # Stopping: the answers gathered for a listen that will not come go in POSTs of their own
        # (a listen now would tell the relay this process is still there).
        for answer in (carrier.take() if carrier is not None else answers):
            self._responder.post_answer(answer)

    def _reserve(self) -> int:
        """Room in the pool for this listen's requests, reserved; 0 after AT_CAPACITY_POLL_SECS with none."""
        limit = MAX_CONCURRENT_REQUESTS + MAX_BACKLOG_REQUESTS
        deadline = time.monotonic() + AT_CAPACITY_POLL_SECS
        with self._room:
            while not self._stop.is_set():
                # Leave room for the other listens, so that none waits on this one's share.
                room = min(limit - self._reserved, limit // LISTENS_IN_FLIGHT)
                if room > 0:
                    self._reserved += room
                    return room
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._room.wait(left)
        return 0

    def _unreserve(self, count: int) -> None:
        with self._room:
            self._reserved -= count
            self._room.notify_all()

    def _leave(self) -> None:
        """Tell the relay this process is going, so it stops handing it requests at once."""
        try:
            with self._new_session() as session:
                r = session.post(self._leave_url, headers={API_KEY_HEADER: self._api_key},
                                 timeout=(CONNECT_TIMEOUT_SECS, LEAVE_TIMEOUT_SECS))
            if r.status_code not in (200, 404):  # 404: a relay without PTTH's own additions
                logger.info("the relay answered %d when told this server is leaving", r.status_code)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            logger.info("could not tell the relay this server is leaving: %s", root_cause(e))

    def _report(self, problem: str) -> None:
        """Log a change of the connection's state once, whichever listen thread sees it."""
        state = problem or "connected"
        with self._lock:
            if state == self._state:
                return
            self._state = state
        if problem:
            logger.warning("%s; retrying with backoff", problem)
        else:
            logger.info("connected to relay %s as %r", self.config.relay_url, self.config.name)

    def _quic_refused(self) -> None:
        """The QUIC relay refused us (wrong certificate or key): stop, as for a 403 (its line is logged)."""
        with self._lock:
            self.exit_code = 1
            self._stop.set()

    def _refused(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return  # another listen thread said it already
            self.exit_code = 1
            self._stop.set()
        logger.error(
            "relay %s refused server %r: its name or API key is not registered there. "
            "Add this server to the relay config: name = %r, tripcode = %r",
            self.config.relay_url, self.config.name, self.config.name, tripcode.derive(self._api_key),
        )

    def _dispatch(self, batch: list[RelayRequest], carrier: AnswerCarrier | None) -> int:
        """Hand requests to the pool; return how many (each keeps its reservation until done).

        A lone request whose answer can ride on the next listen is answered
        here, in the listen thread (Responder.start_here): at concurrency 1
        the two hand-offs between threads are a tenth of the request's time.
        """
        taken = 0
        for req in batch:
            work = (self._responder.start_here(req, carrier) if len(batch) == 1 and carrier is not None
                    else partial(self._responder.respond, req, carrier))
            if work is None:
                return taken  # answered: it rides on the next listen
            with self._lock:
                if self._stop.is_set():
                    return taken  # the relay fails these when it counts us gone
                future = self._pool.submit(work)
                self._in_flight.add(future)
            taken += 1
            future.add_done_callback(self._done)
        return taken

    def _done(self, future: Future[None]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        self._unreserve(1)
        if future.exception() is not None:
            logger.error("bug while answering a request", exc_info=future.exception())

    # ---- P4/P5: answer one request ---------------------------------------

    def _new_session(self) -> requests.Session:
        """A Session for one thread (requests_adapter.new_session: no redirects, early answers seen)."""
        return new_session(self._proxies, f"ptth_server/{__version__}")


def _raise_open_files_limit() -> None:
    """Let this process open as many files as the system allows it: each WebSocket takes three sockets."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        logger.info("could not raise the open-files limit: %s", e)


def _run_quic_end_server(config: ServerConfig, stop: list[Callable[[], None]],
                         refused: Callable[[], None]) -> None:
    """The [quic] side of port forwarding, in a thread with its own gevent hub.

    gevent runs one hub per thread, so the QUIC proxy's greenlets live here
    while the rest of the server stays plain threads. `stop` receives the
    function that stops it from another thread; `refused` is called if the
    relay refuses us, which retrying cannot fix. ptth_quic_end_server.py runs
    the same QuicEndServer on its own.
    """
    from ptth_lib.forward.quic.proxies import QuicEndServer

    server = QuicEndServer(config)
    stop.append(server.stopper())
    if server.run():
        refused()
