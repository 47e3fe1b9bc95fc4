"""The process's Redis client and the one prefix every key and channel carries."""

from functools import lru_cache
from typing import Any

import redis
from django.conf import settings
from redis.client import PubSub


class _Client(redis.Redis):
    """A client whose subscriptions (`pubsub()`) take their connections from a pool of their own.

    A subscription's connection is disconnected when the subscription closes, then goes back to its
    pool: on the pool of commands, the next command to take it (LIFO) would first connect again,
    which costs ten times the command, inside whatever request came after a `?wait`.
    """

    subscriptions: redis.Redis

    def pubsub(self, **kwargs: Any) -> PubSub:
        return self.subscriptions.pubsub(**kwargs)


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # One client per process: building one costs more than a round trip, and it is thread-safe.
    # Its pools notice a fork and open new connections in the child.
    client = _Client.from_url(url, health_check_interval=30)
    client.subscriptions = redis.Redis.from_url(url, health_check_interval=30)
    return client


def redis_client() -> redis.Redis:
    """The process-wide client (safe to share between threads)."""
    return _client(settings.REDIS_URL)


def redis_delete_matching(pattern: str, *, client: redis.Redis | None = None) -> int:
    """Delete every key matching a glob pattern, a thousand at a time (SCAN, never KEYS); returns how many."""
    client = client or redis_client()
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += client.delete(*batch)
            batch = []
    if batch:
        removed += client.delete(*batch)
    return removed


def redis_key(*parts: object) -> str:
    """A key or channel name under the deployment's prefix: redis_key('events', 'all') -> 'ap:events:all'."""
    return settings.REDIS_KEY_PREFIX + ":".join(str(part) for part in parts)
