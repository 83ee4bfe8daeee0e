"""Port forwarding over QUIC (spec 004): aioquic driven by gevent (`driver`), the relay's
certificate (`cert`), its UDP endpoint (`endpoint`), the proxies (`proxies`) and the relay (`relay`)."""
