"""The server behind the firewall: the long-poll loop (`loop`) and the file server (`file_server`)."""
