"""A server played by a script: answers each request for a path as a table says.

It speaks spec 002 by hand (listen, then POST the head and body), with
msgpack and requests and nothing of ptth_lib, so the relay is tested against
a server that sends whatever a test wants: headers the relay must drop,
malformed heads, slow answers.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import msgpack
import requests

Answer = tuple[int, dict[str, bytes], bytes]


@dataclass
class ScriptedServer:
    relay_url: str
    name: str
    key: str
    answer: Callable[[str, dict[str, bytes]], Answer]  # (uri, request headers) -> status, headers, body
    seen: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # every request, in order
    posts: list[int] = field(default_factory=list)  # the relay's status for each response POST
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ScriptedServer:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                r = session.get(f"{self.relay_url}/7ZSFUKGV/http_listen/{quote(self.name, safe='')}",
                                headers={"X-ApiKey": self.key}, timeout=60)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if r.status_code != 200:
                time.sleep(0.05 if r.status_code == 204 else 0.5)
                continue
            for item in msgpack.unpackb(r.content, raw=False):
                req = item["req"]
                self.seen.append((req["uri"], req["headers"]))
                threading.Thread(target=self._respond, args=(item["id"], req), daemon=True).start()

    def _respond(self, rid: str, req: dict) -> None:  # type: ignore[type-arg]
        status, headers, body = self.answer(req["uri"], req["headers"])
        head = base64.b64encode(msgpack.packb({"status_code": status, "headers": headers})).decode()
        try:
            r = requests.post(f"{self.relay_url}/7ZSFUKGV/http_response/{rid}", data=body, timeout=60,
                              headers={"X-ApiKey": self.key, "X-PTTH-2LJYXWC4": head})
            self.posts.append(r.status_code)
        except requests.RequestException:
            self.posts.append(-1)
