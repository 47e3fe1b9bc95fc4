"""A Redis lock that lapses soon after its holder dies: a short expiry that the holder keeps renewing."""

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from agentplatform.redis_client import redis_client

logger = logging.getLogger(__name__)

# Only the holder (the token's owner) may extend or remove the lock.
EXTEND_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ExpiringLock:
    """SET NX PX with a random token; released and renewed only by compare-and-act Lua scripts."""

    def __init__(self, key: str, *, ttl_seconds: float) -> None:
        self.key = key
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.token = uuid.uuid4().hex

    def queue_acquire(self, pipe: redis.client.Pipeline) -> None:
        """Add the acquiring SET to a pipeline (its reply is True when the lock was taken)."""
        pipe.set(self.key, self.token, nx=True, px=self.ttl_ms)

    def renew(self) -> bool:
        """Extend the expiry to the full TTL again; False if the lock is no longer ours."""
        return bool(redis_client().eval(EXTEND_IF_HELD, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> bool:
        return bool(redis_client().eval(RELEASE_IF_HELD, 1, self.key, self.token))

    def queue_release(self, pipe: redis.client.Pipeline) -> None:
        """Add the releasing script to a pipeline."""
        pipe.eval(RELEASE_IF_HELD, 1, self.key, self.token)

    @contextmanager
    def kept_alive(self) -> Iterator[None]:
        """Renew the lock every third of its TTL from a small thread until the block ends."""
        done = threading.Event()
        renewer = threading.Thread(target=self._renew_until, args=(done,), name="lock-renewal", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()

    def _renew_until(self, done: threading.Event) -> None:
        while not done.wait(self.ttl_ms / 3000):
            try:
                if not self.renew():
                    logger.warning("lost the lock %s (it expired or was removed); no longer renewing it", self.key)
                    return
            except redis.RedisError:
                # The next tick tries again; if Redis stays away the lock lapses, as for a dead holder.
                logger.warning("could not renew the lock %s", self.key, exc_info=True)
