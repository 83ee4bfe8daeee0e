"""TCP port forwarding: one splice for every proxy (`splice`, with the shared tunables in
`limits`), the client program over either transport (`client`), the HTTP proxies
(`http_client`, `http_server`, and the relay's streams as a splice end in `http_streams`)
and everything over QUIC (`quic`)."""
