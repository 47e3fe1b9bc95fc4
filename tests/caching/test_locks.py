import time
import uuid

from agentplatform.redis_client import redis_client, redis_key
from caching.locks import ExpiringLock


def taken(lock: ExpiringLock) -> bool:
    pipe = redis_client().pipeline()
    lock.queue_acquire(pipe)
    return bool(pipe.execute()[0])


def lock_key() -> str:
    return redis_key("test", "lock", uuid.uuid4().hex)


def test_a_lock_kept_alive_outlives_its_ttl_and_one_left_alone_lapses():
    kept, left = ExpiringLock(lock_key(), ttl_seconds=0.3), ExpiringLock(lock_key(), ttl_seconds=0.3)
    assert taken(kept)
    assert taken(left)

    with kept.kept_alive():
        time.sleep(0.6)
        assert redis_client().exists(kept.key, left.key) == 1

    assert kept.release() is True


def test_only_the_holder_renews_or_releases():
    key = lock_key()
    holder, other = ExpiringLock(key, ttl_seconds=5), ExpiringLock(key, ttl_seconds=5)
    assert taken(holder)

    assert taken(other) is False
    assert other.renew() is False
    assert other.release() is False
    assert redis_client().get(key) == holder.token.encode()
