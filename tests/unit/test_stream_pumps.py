"""The forwarding stream loops fed by an iterator of pieces and cut by a function (forward_api.pump_in/out).

In one process they are fed by a request body and cut by shutting a socket;
in a cluster, by a peer link (cluster/streams.py). Here by plain generators.
"""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest
from test_relay import relay_config

from ptth_lib.relay.forward_api import pump_in, pump_out
from ptth_lib.relay.forwarding import ForwardedConnection, PortForwarding

pytestmark = pytest.mark.usefixtures("bounded")


def opened() -> tuple[PortForwarding, ForwardedConnection]:
    fw = PortForwarding(relay_config())
    conn = ForwardedConnection("id", "laptop", "alpha", "echo")
    fw.connections[conn.id] = conn
    return fw, conn


def test_pieces_in_then_out_with_the_clean_end_as_a_half_close() -> None:
    fw, conn = opened()
    cuts: list[str] = []
    writer = gevent.spawn(pump_in, fw, conn, conn.up, "upstream", iter([b"a", b"bc", b"d"]))
    got = b"".join(pump_out(fw, conn, conn.up, "accept", lambda: cuts.append("accept")))
    assert writer.get() == (200, "upstream ended")
    assert got == b"abcd" and not cuts
    assert conn.finished == {"upstream", "accept"} and not conn.aborted


def test_pieces_that_break_off_abort_the_connection_and_cut_the_taker() -> None:
    fw, conn = opened()
    cuts: list[str] = []

    def broken() -> Iterator[bytes]:
        yield b"first"
        raise OSError("the sender's connection reset")

    assert pump_in(fw, conn, conn.up, "upstream", broken()) == (400, "upstream broke off")
    assert conn.aborted and "upstream broke off (OSError)" in conn.abort_reason
    # The taker never passes the piece on as if the stream were whole: it is cut instead.
    assert list(pump_out(fw, conn, conn.up, "accept", lambda: cuts.append("accept"))) == []
    assert cuts == ["accept"]
    assert "id" not in fw.connections


def test_an_abort_while_feeding_answers_410_and_cuts_every_stream_registered() -> None:
    fw, conn = opened()
    cut: list[str] = []
    fw.add_cut(conn, "downstream", lambda: cut.append("downstream link"))

    def endless() -> Iterator[bytes]:
        while True:
            yield b"x" * 1024

    feeder = gevent.spawn(pump_in, fw, conn, conn.down, "downstream", endless())
    gevent.sleep(0.01)  # the pipe fills: the feeder waits for room (backpressure)
    assert not feeder.dead
    fw.abort(conn, "the client's connection broke")
    assert feeder.get() == (410, "the connection was closed")
    assert cut == ["downstream link"]


def test_a_taker_that_stops_early_aborts_the_connection() -> None:
    fw, conn = opened()
    conn.up.put(b"one")
    taker = pump_out(fw, conn, conn.up, "accept", lambda: None)
    assert next(taker) == b"one"
    taker.close()  # the server's GET went away
    assert conn.aborted and conn.abort_reason == "accept stream closed"


def test_a_cut_registered_on_an_aborted_connection_runs_at_once() -> None:
    fw, conn = opened()
    fw.abort(conn, "gone")
    cut: list[str] = []
    fw.add_cut(conn, "accept", lambda: cut.append("accept"))
    assert cut == ["accept"]
