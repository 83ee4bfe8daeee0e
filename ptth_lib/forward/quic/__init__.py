"""Port forwarding over QUIC (spec 004): aioquic driven by gevent (`driver`), every aioquic
internal PTTH relies on (`aioquic_adapter`), the relay's certificate (`cert`), its UDP
endpoint (`endpoint`), a forwarded connection's stream (`streams`), the proxies (`proxies`)
and the relay (`relay`)."""
