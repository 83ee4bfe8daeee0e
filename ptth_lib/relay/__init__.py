"""The relay, one object (`relay.Relay`) wired to Flask (`app`).

Its parts: the rendezvous where servers' long-polls meet clients' requests
(`rendezvous`, with `shares` and `body_stream`), delivery both ways
(`delivery`), port forwarding's state and routes (`forwarding`,
`forward_api`), web apps (request bodies the server fetches,
`request_body`; WebSockets carried as forwarded connections, `upgrade`;
per-server logins, `basic_auth`), the scraper API, metrics, the audit log, config reloads, the
rules at its edge (`trust`), its pages (`pages`), its own answers
(`responses`) and the WSGI fast path (`hot_paths`)."""
