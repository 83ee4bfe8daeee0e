"""The relay: where servers' long-polls meet clients' requests (`rendezvous`), port
forwarding's state and routes (`forwarding`, `forward_api`), the scraper API, metrics, the
audit log, config reloads, the rules at its edge (`trust`), and the Flask app (`app`)."""
