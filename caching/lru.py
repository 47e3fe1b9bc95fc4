"""An in-process least-recently-used cache bounded by entry count and by total bytes."""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class LocalEntry:
    raw: bytes
    expires_at: float  # time.monotonic()
    size: int


class BoundedLRU:
    """Byte strings under string keys, evicting the least recently used past either bound; thread-safe.

    `generation` changes whenever entries are dropped on purpose (not evicted): a value read from
    Redis before an invalidation must not be stored after it, so `put` takes the generation the
    caller saw before its read and stores nothing if it has moved on.
    """

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.generation = 0
        self._entries: OrderedDict[str, LocalEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None if absent or expired; a hit becomes the most recently used."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires_at <= time.monotonic():
                self._remove(key)
                return None
            self._entries.move_to_end(key)
            return entry.raw

    def put(self, key: str, raw: bytes, *, ttl: float, generation: int) -> bool:
        """Store `raw` for `ttl` seconds unless entries were dropped since `generation`; True if stored."""
        size = len(key) + len(raw)
        with self._lock:
            if generation != self.generation or ttl <= 0 or size > self.max_bytes or self.max_entries <= 0:
                return False
            if key in self._entries:
                self._remove(key)
            self._entries[key] = LocalEntry(raw=raw, expires_at=time.monotonic() + ttl, size=size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
            return True

    def discard(self, key: str) -> None:
        with self._lock:
            self.generation += 1
            if key in self._entries:
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._entries.clear()
            self._bytes = 0

    def _remove(self, key: str) -> None:
        self._bytes -= self._entries.pop(key).size
