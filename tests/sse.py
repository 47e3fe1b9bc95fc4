"""A small Server-Sent Events client for tests that talk to a real events server."""

import http.client
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class ServerSent:
    """One item of a stream: an event with its JSON data, or a comment line."""

    event: str | None = None
    data: dict | None = None
    comment: str | None = None


@dataclass
class EventStreamClient:
    url: str
    token: str | None = None
    cookie: str | None = None
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        if self.cookie:
            headers["Cookie"] = self.cookie
        self.connection.request("GET", f"{parts.path}?{parts.query}", headers=headers)
        self.response = self.connection.getresponse()
        self.status = self.response.status
        self.headers = {name.lower(): value for name, value in self.response.getheaders()}

    def json(self) -> dict:
        return json.loads(self.response.read())

    def next(self, timeout: float = 10) -> ServerSent | None:
        """The next event or comment; None when the server ended the stream."""
        self.connection.sock.settimeout(timeout)
        item = ServerSent()
        while True:
            try:
                line = self.response.readline().decode()
            except TimeoutError as exc:
                raise AssertionError(f"nothing from {self.url} within {timeout}s") from exc
            if not line:
                return None
            line = line.rstrip("\n")
            if line == "":
                if item.event or item.comment is not None:
                    return item
                continue
            if line.startswith(":"):
                item.comment = line[1:].strip()
            elif line.startswith("event:"):
                item.event = line[6:].strip()
            elif line.startswith("data:"):
                item.data = json.loads(line[5:].strip())

    def next_event(self, timeout: float = 10) -> ServerSent:
        """The next event, past any comments."""
        deadline = time.monotonic() + timeout
        while (item := self.next(max(deadline - time.monotonic(), 0.1))) is not None:
            if item.event:
                return item
        raise AssertionError("the stream ended")

    def subscribed(self, timeout: float = 10) -> None:
        """Wait for the server's word that the subscription is live."""
        item = self.next(timeout)
        assert item is not None
        assert item.comment == "subscribed", item

    def events_until_end(self, timeout: float = 10) -> list[ServerSent]:
        deadline = time.monotonic() + timeout
        items = []
        while (item := self.next(max(deadline - time.monotonic(), 0.1))) is not None:
            if item.event:
                items.append(item)
        return items

    def close(self) -> None:
        self.connection.close()
