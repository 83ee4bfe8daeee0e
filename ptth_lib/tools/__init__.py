"""Programs around PTTH: the demo (`make demo`) and the health check for cron."""
