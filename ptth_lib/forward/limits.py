"""The tunables every forwarding proxy shares, over HTTP and over QUIC: one name and one place each.

Sizes and timeouts that only one transport has stay beside the code that
uses them: the HTTP server proxy's listen timings (`http_server`), QUIC's
windows, keepalive and packet sizes (`quic/driver`, `quic/quic_adapter`),
the tip deadline and reconnection (`quic/streams`, `quic/proxies`), the QUIC
relay's hello deadline and caps (`quic/relay`, `quic/endpoint`).
"""

from __future__ import annotations

# Largest piece a proxy reads from its TCP peer and passes on at once: one
# chunk of an HTTP POST body (the relay's pieces are this size too,
# relay/forwarding.PIECE_BYTES), one write to a QUIC stream. Smaller reads
# happen whenever less is waiting, so a keystroke crosses alone; 256 KiB
# keeps bulk transfers to a few thousand pieces a second at 500 MiB/s. QUIC
# read 64 KiB before the two shared this: bench/forward.py --only-quic, two
# runs each, showed no loss with 256 KiB (if anything a little less CPU).
PIECE_BYTES = 256 * 1024

# Reaching the relay: an HTTP connection's TCP connect (and the answers to the
# short calls), or a QUIC connection's handshake. Far above a slow link's
# round trips; a relay that takes longer counts as unreachable and is retried.
RELAY_CONNECT_TIMEOUT_SECS = 10.0

# The server proxy connecting to the local address of a forwarded port. The
# relay gives it 10 s to accept or refuse (HTTP) or to answer the offer
# (QUIC's tip deadline), so a refusal still gets there in time.
LOCAL_CONNECT_TIMEOUT_SECS = 5.0

# While its TCP peer is quiet, an HTTP proxy's thread waits on the peer for
# at most this long, then checks whether the relay has closed one of its HTTP
# connections meanwhile (the relay notices a vanished proxy the same way).
# Also how long an aborted splice may take to give up a blocked write.
WATCH_SECS = 3.0

# The client proxy's listening sockets: connections accepted but not yet served.
ACCEPT_BACKLOG = 128

# The HTTP relay's answers other than the streams (the key check, refusals,
# a POST's answer) are a short JSON object or a line of text; more is not read.
MAX_ANSWER_BYTES = 4096
