"""@memoize on real Redis: the local LRU, the shared entries, single flight, invalidation and statistics."""

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentplatform.redis_client import redis_client
from caching import memoize as memoize_module
from caching.memoize import Memoized, MemoStats, memo_stats, memo_stats_key, memoize
from tests.caching import memo_process
from tests.conftest import worker_env
from tests.polling import eventually

ROOT = Path(__file__).resolve().parents[2]


def unique_name() -> str:
    return f"tests.memo_{uuid.uuid4().hex[:10]}"


def counted(*, seconds: float = 0.0, **options) -> tuple[Memoized, list[int]]:
    """A memoized `double(n, extra=0)` and the list of the `n` it was computed for."""
    calls: list[int] = []

    def double(n: int, extra: int = 0) -> int:
        calls.append(n)
        time.sleep(seconds)
        return 2 * n + extra

    options.setdefault("ttl", 60)
    options.setdefault("name", unique_name())
    return memoize(**options)(double), calls


def start_process(mode: str, key: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.caching.memo_process", mode, key], cwd=ROOT, env={**worker_env(), **env}
    )


def test_a_second_call_is_answered_from_this_process():
    double, calls = counted()

    assert double(2) == 4
    assert double(2) == 4

    assert calls == [2]
    stats = double.stats()
    assert (stats.local_hits, stats.redis_hits, stats.misses, stats.computations) == (1, 0, 1, 1)


def test_positional_keyword_and_default_arguments_share_an_entry():
    double, calls = counted()

    double(2)
    double(n=2)
    double(2, extra=0)

    assert calls == [2]


def test_another_process_finds_the_value_in_redis():
    double, calls = counted()
    double(3)
    double.local_clear()  # what a process that never called it has

    assert double(3) == 6

    assert calls == [3]
    assert double.stats().redis_hits == 1


def test_redis_holds_json_with_the_compute_time():
    double, _ = counted(seconds=0.05)

    double(4)

    stored = json.loads(redis_client().get(double.key(4)))
    assert stored["value"] == 8
    assert stored["compute_ms"] >= 50
    assert double.key(4).startswith(memoize_module.redis_key("memo", double.name, "1", ""))


def test_a_new_version_is_a_new_entry():
    name = unique_name()
    first, calls = counted(name=name, version="1")
    second = memoize(ttl=60, name=name, version="2")(first.fn)

    first(5)
    second(5)

    assert calls == [5, 5]
    assert first.key(5) != second.key(5)
    assert redis_client().exists(first.key(5), second.key(5)) == 2


@pytest.mark.parametrize("argument", [object(), {1, 2}, math.nan])
def test_arguments_json_cannot_hold_raise_type_error_naming_the_function(argument):
    double, calls = counted()

    with pytest.raises(TypeError, match=f"memoized function {double.name}: arguments must be JSON-serialisable"):
        double(argument)

    assert calls == []


def test_a_result_json_cannot_hold_raises_type_error_and_is_not_stored():
    name = unique_name()

    @memoize(ttl=60, name=name)
    def opaque(n: int) -> object:
        return object()

    with pytest.raises(TypeError, match=f"memoized function {name}: its result must be JSON-serialisable"):
        opaque(1)

    assert redis_client().exists(opaque.key(1)) == 0


def test_a_stored_none_is_a_hit_and_a_tuple_comes_back_as_a_list():
    calls = []

    @memoize(ttl=60, name=unique_name())
    def pair(n: int) -> tuple | None:
        calls.append(n)
        return None if n == 0 else (n, n)

    assert [pair(0), pair(0), pair(1), pair(1)] == [None, None, [1, 1], [1, 1]]
    assert calls == [0, 1]


def test_the_lru_keeps_max_entries_evicting_the_least_recently_used():
    double, calls = counted(max_entries=2)
    double(1)
    double(2)
    double(1)  # 1 is now the most recently used

    double(3)  # evicts 2 from this process, not from Redis
    double(1)
    double(2)

    assert calls == [1, 2, 3]
    assert (double.stats().local_hits, double.stats().redis_hits) == (2, 1)


def test_the_lru_keeps_max_bytes():
    calls = []

    @memoize(ttl=60, name=unique_name(), max_bytes=300)
    def padded(n: int) -> str:
        calls.append(n)
        return "x" * 100

    for n in (1, 2, 3, 1):
        padded(n)

    # Each entry takes ~170 bytes (64-character key, wrapped value): only one fits, so 1 came from Redis.
    assert calls == [1, 2, 3]
    assert padded.stats().redis_hits == 1
    assert padded.stats().local_hits == 0


def test_entries_expire_from_redis_and_the_lru_with_the_ttl():
    double, calls = counted(ttl=0.3)
    double(1)

    time.sleep(0.4)

    assert redis_client().exists(double.key(1)) == 0
    double(1)
    assert calls == [1, 1]


def test_counters_reach_redis_within_about_a_second_without_a_round_trip_per_hit():
    double, _ = counted()
    stats_key = memo_stats_key(double.name)
    double(1)  # a computation: its counters are written with the value
    assert redis_client().hmget(stats_key, ["misses", "computations", "local_hits"]) == [b"1", b"1", None]

    double(1)
    double(1)

    eventually(lambda: redis_client().hget(stats_key, "local_hits") == b"2", seconds=3, every=0.02)


def test_memo_stats_sums_hits_misses_computations_and_time_saved():
    double, _ = counted(seconds=0.05)
    double(1)
    double(1)
    double.local_clear()
    double(1)

    stats = memo_stats()[double.name]

    assert (stats.local_hits, stats.redis_hits, stats.misses, stats.computations) == (1, 1, 1, 1)
    assert stats.compute_ms >= 50
    assert stats.saved_ms == pytest.approx(2 * json.loads(redis_client().get(double.key(1)))["compute_ms"])
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert memo_stats([unique_name()]).popitem()[1] == MemoStats()


def test_invalidate_removes_the_entry_from_redis_and_this_process():
    double, calls = counted()
    double(1)
    double(2)

    assert double.invalidate(1) is True

    assert redis_client().exists(double.key(1)) == 0
    double(1)
    double(2)
    assert calls == [1, 2, 1]


def test_clear_removes_every_entry_of_every_version():
    name = unique_name()
    first, calls = counted(name=name, version="1")
    first(1)
    first(2)
    second = memoize(ttl=60, name=name, version="2")(first.fn)
    second(1)
    other, _ = counted()
    other(1)

    assert second.clear() == 3

    assert redis_client().exists(first.key(1), first.key(2), second.key(1)) == 0
    assert redis_client().exists(other.key(1)) == 1
    second(1)
    assert calls == [1, 2, 1, 1]


def test_a_name_taken_by_another_function_or_reserved_is_refused():
    double, _ = counted()

    with pytest.raises(ValueError, match="already taken"):
        memoize(ttl=60, name=double.name)(lambda n: n)
    with pytest.raises(ValueError, match="must match"):
        memoize(ttl=60, name="stats")(lambda n: n)


def test_a_function_calling_itself_with_the_same_arguments_raises():
    @memoize(ttl=60, name=unique_name())
    def loop(n: int) -> int:
        return loop(n)

    with pytest.raises(RecursionError, match="calls itself with the same arguments"):
        loop(1)


def test_without_redis_the_function_is_simply_called(monkeypatch):
    double, calls = counted()
    double(0)  # this process's listener is up: the outage below is Redis's alone
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    monkeypatch.setattr(memoize_module, "redis_client", lambda: unreachable)

    assert double(1) == 2
    assert double(1) == 2

    assert calls == [0, 1, 1]


def test_concurrent_calls_compute_once():
    double, calls = counted(seconds=0.3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(double(7))) for _ in range(5)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [14] * 5
    assert calls == [7]


def hold_in_thread(fn: Memoized, computing: threading.Event, *args) -> threading.Thread:
    """Call `fn(*args)` in a thread; return once its computation has begun (it holds the lock)."""

    def call() -> None:
        with contextlib.suppress(RuntimeError):
            fn(*args)

    thread = threading.Thread(target=call)
    thread.start()
    assert computing.wait(5)
    return thread


def test_a_waiter_is_woken_by_the_holders_message_not_by_the_lock_expiry(settings):
    settings.MEMO_LOCK_TTL_SECONDS = 10
    computing = threading.Event()
    finished_at = []

    @memoize(ttl=60, name=unique_name())
    def slow(n: int) -> int:
        computing.set()
        time.sleep(0.5)
        finished_at.append(time.monotonic())
        return n

    holder = hold_in_thread(slow, computing, 1)
    assert slow(1) == 1
    returned_at = time.monotonic()
    holder.join()

    assert len(finished_at) == 1
    assert returned_at - finished_at[0] < 0.3
    assert slow.stats().misses == 2


def test_when_the_holder_fails_a_waiter_computes_at_once(settings):
    settings.MEMO_LOCK_TTL_SECONDS = 10
    computing = threading.Event()
    calls = []

    @memoize(ttl=60, name=unique_name())
    def fails_first(n: int) -> int:
        calls.append(n)
        computing.set()
        time.sleep(0.3)
        if len(calls) == 1:
            raise RuntimeError("the first computation fails")
        return n

    holder = hold_in_thread(fails_first, computing, 1)
    started = time.monotonic()
    assert fails_first(1) == 1
    holder.join()

    assert calls == [1, 1]
    assert time.monotonic() - started < 2


def test_a_killed_holder_is_taken_over_once_its_lock_lapses():
    key = uuid.uuid4().hex
    client = redis_client()
    client.set(memo_process.sleep_key(key), 30)
    process = start_process("hold", key, MEMO_LOCK_TTL_SECONDS="1")
    try:
        eventually(
            lambda: client.get(memo_process.holder_pid_key(key)) == str(process.pid).encode(), seconds=15, every=0.02
        )
    finally:
        process.kill()
        process.wait()
    client.set(memo_process.sleep_key(key), 0)

    started = time.monotonic()
    result = memo_process.blocking(key)

    assert time.monotonic() - started < 4
    assert result["pid"] != process.pid
    assert int(client.get(memo_process.computations_key(key))) == 2


def test_invalidate_and_clear_reach_the_lru_of_another_process():
    key = uuid.uuid4().hex
    client = redis_client()
    client.set(memo_process.value_key(key), "a")
    process = start_process("watch", key)

    def seen() -> bytes | None:
        return client.get(memo_process.seen_key(key))

    try:
        eventually(lambda: seen() == b"a", seconds=15, every=0.02)
        client.set(memo_process.value_key(key), "b")
        time.sleep(0.3)
        assert seen() == b"a"  # still answered from its memo

        memo_process.current.invalidate(key)
        eventually(lambda: seen() == b"b", seconds=3, every=0.02)

        client.set(memo_process.value_key(key), "c")
        memo_process.current.clear()
        eventually(lambda: seen() == b"c", seconds=3, every=0.02)
    finally:
        process.kill()
        process.wait()


def test_a_forked_child_starts_with_an_empty_lru():
    double, calls = counted()
    double(1)  # now in this process's LRU
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:  # the child: answer from Redis, not from a copy of the parent's memory
        try:
            double(1)
            os.write(write_end, json.dumps([len(calls), double.stats().redis_hits]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        reported = json.loads(reader.read())
    os.waitpid(pid, 0)

    assert reported == [1, 1]
