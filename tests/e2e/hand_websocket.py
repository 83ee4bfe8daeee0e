"""A WebSocket client by hand (wsproto on a plain socket): any Host header, any frame, events one by one."""

from __future__ import annotations

import socket
from typing import Any, Self

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Request


class HandWebSocket:
    """One WebSocket to 127.0.0.1:`port`, handshaken with Host `host` for `target`."""

    def __init__(self, port: int, host: str, target: str, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Event] = []
        self.send(Request(host=host, target=target))
        self.until(AcceptConnection)

    def send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def until(self, kind: type[Any]) -> Any:
        """The next event of `kind` (earlier ones of other kinds stay for later calls)."""
        while not any(isinstance(e, kind) for e in self._events):
            data = self.sock.recv(65536)
            assert data, f"connection ended before {kind.__name__}"
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        found = next(e for e in self._events if isinstance(e, kind))
        self._events.remove(found)
        return found

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
