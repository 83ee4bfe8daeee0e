"""TCP port forwarding: the splice between a TCP socket and the tunnel (`splice`), the
proxies over HTTP (`http_client`, `http_server`) and everything over QUIC (`quic`)."""
