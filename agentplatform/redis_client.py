"""The process's Redis connection and the one prefix every key and channel carries."""

from functools import lru_cache

import redis
from django.conf import settings


@lru_cache(maxsize=1)
def _pool(url: str) -> redis.ConnectionPool:
    return redis.ConnectionPool.from_url(url, health_check_interval=30)


def redis_client() -> redis.Redis:
    """A client on the process-wide pool (safe to share between threads)."""
    return redis.Redis(connection_pool=_pool(settings.REDIS_URL))


def redis_key(*parts: object) -> str:
    """A key or channel name under the deployment's prefix: redis_key('events', 'all') -> 'ap:events:all'."""
    return settings.REDIS_KEY_PREFIX + ":".join(str(part) for part in parts)
