import time

from caching.lru import BoundedLRU


def test_beyond_max_entries_the_least_recently_used_goes():
    cache = BoundedLRU(max_entries=2, max_bytes=10_000)
    cache.put("a", b"1", ttl=60, generation=0)
    cache.put("b", b"2", ttl=60, generation=0)
    cache.get("a")

    cache.put("c", b"3", ttl=60, generation=0)

    assert [key in cache for key in "abc"] == [True, False, True]


def test_beyond_max_bytes_the_least_recently_used_go():
    cache = BoundedLRU(max_entries=100, max_bytes=250)
    for key in "abc":
        cache.put(key, b"x" * 99, ttl=60, generation=0)  # 100 bytes with the key

    assert [key in cache for key in "abc"] == [False, True, True]
    assert cache.total_bytes == 200


def test_an_entry_larger_than_max_bytes_is_not_kept():
    cache = BoundedLRU(max_entries=100, max_bytes=50)

    assert cache.put("a", b"x" * 50, ttl=60, generation=0) is False
    assert len(cache) == 0


def test_an_expired_entry_is_a_miss():
    cache = BoundedLRU(max_entries=10, max_bytes=1000)
    cache.put("a", b"1", ttl=0.05, generation=0)

    time.sleep(0.1)

    assert cache.get("a") is None
    assert cache.total_bytes == 0


def test_a_value_read_before_an_invalidation_is_not_stored_after_it():
    cache = BoundedLRU(max_entries=10, max_bytes=1000)
    seen = cache.generation
    cache.discard("a")

    assert cache.put("a", b"stale", ttl=60, generation=seen) is False
    assert cache.get("a") is None
