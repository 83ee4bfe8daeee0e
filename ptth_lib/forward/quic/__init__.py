"""Port forwarding over QUIC (spec 004): qh3 driven by gevent (`driver`), every qh3
internal PTTH relies on (`quic_adapter`), batched UDP (`udp`), the relay's certificate
(`cert`), its UDP endpoint (`endpoint`), a forwarded connection's stream (`streams`), the
proxies (`proxies`) and the relay (`relay`)."""
