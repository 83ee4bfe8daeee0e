"""What travels between PTTH's programs: the envelopes of spec 002 (`envelope`), the QUIC
stream tips of spec 004 (`tip`), and tripcodes (`tripcode`). No sockets here."""
