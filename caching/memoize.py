"""Memoized computation: @memoize computes each distinct call of a function once, for every process.

A call looks in this process's LRU, then in Redis under
`<prefix>memo:<function>:<version>:<sha256 of the canonical JSON arguments>`. On a miss exactly one
process computes: it holds a lock that lapses within MEMO_LOCK_TTL_SECONDS unless it keeps renewing
it, and when it is done (or has failed) it publishes on the entry's channel. The others wait on that
channel, woken by the message or, if the holder died, by the lock's expiry; then they read the
value, or take the lock and compute themselves.

Arguments and results are JSON, never pickle: nothing Redis holds can become code. A caller always
gets the result as JSON gives it back (a tuple comes back as a list), on a hit as on a miss.

`invalidate(...)` and `clear()` remove entries from Redis and publish the fact; every process runs
one listener thread that drops them from its LRU and, about once a second, adds its hit and miss
counters to the function's statistics in Redis, so that a local hit costs no round trip.
"""

import hashlib
import inspect
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import update_wrapper
from typing import Any

import redis
from django.conf import settings

from agentplatform.redis_client import redis_client, redis_delete_matching, redis_key
from caching.locks import ExpiringLock
from caching.lru import BoundedLRU

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.<>-]{0,199}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
# Keys of these shapes sit beside the entries under "memo", so no function may take these names.
RESERVED_NAMES = frozenset({"stats", "lock", "done", "invalidate"})
STATS_FLUSH_SECONDS = 1.0
SUBSCRIBE_TIMEOUT_SECONDS = 2.0
# A waiter whose holder went silent waits for the lock's remaining TTL plus this, so it wakes after the expiry.
LAPSE_MARGIN_SECONDS = 0.05

# Only while it still holds the lock does the computing process store its value: an invalidation
# removes the lock too, so a computation that overlapped one cannot put back a stale value.
STORE_IF_HELD = """
local stored = 0
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  stored = 1
end
redis.call('PUBLISH', ARGV[4], 'done')
return stored
"""


def memo_key(name: str, version: str, digest: str) -> str:
    return redis_key("memo", name, version, digest)


def memo_lock_key(name: str, version: str, digest: str) -> str:
    return redis_key("memo", "lock", name, version, digest)


def memo_done_channel(name: str, version: str, digest: str) -> str:
    """Where the computing process announces that an entry is done or that it failed."""
    return redis_key("memo", "done", name, version, digest)


def memo_invalidate_channel() -> str:
    return redis_key("memo", "invalidate")


def memo_stats_key(name: str) -> str:
    return redis_key("memo", "stats", name)


@dataclass(frozen=True)
class MemoStats:
    """A memoized function's counters, summed over every process."""

    local_hits: int = 0
    redis_hits: int = 0
    misses: int = 0
    computations: int = 0
    compute_ms: float = 0.0
    saved_ms: float = 0.0

    @property
    def hits(self) -> int:
        return self.local_hits + self.redis_hits

    @property
    def calls(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        """Share of calls answered from a cache (0 to 1); None before any call."""
        return self.hits / self.calls if self.calls else None


COUNTER_FIELDS = ("local_hits", "redis_hits", "misses", "computations")
TIMING_FIELDS = ("compute_ms", "saved_ms")


class Memoized:
    """A memoized function: called like the original, plus `invalidate(...)`, `clear()` and `stats()`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str,
        version: str,
        ttl: float,
        max_entries: int | None,
        max_bytes: int | None,
    ) -> None:
        update_wrapper(self, fn)
        self.fn = fn
        self.name = name
        self.version = version
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._signature = inspect.signature(fn)

    def __repr__(self) -> str:
        return f"<memoized {self.name} version {self.version}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        digest = self._digest(args, kwargs)
        state = _process_state()
        cache = state.cache_for(self)
        # Read before anything else, so that an invalidation during this call keeps its value out of the LRU.
        generation = cache.generation
        raw = cache.get(digest)
        if raw is not None:
            return self._answer(raw, state, local_hits=1)
        key = memo_key(self.name, self.version, digest)
        computing = _computing_in_this_thread()
        if key in computing:
            raise RecursionError(f"memoized function {self.name} calls itself with the same arguments")
        try:
            lookup = self._find_or_lock(digest)
        except redis.RedisError:
            # The shared cache is an optimisation: without Redis the function is simply called.
            logger.warning("memoized function %s: Redis unavailable, computing without the cache", self.name)
            state.count(self.name, misses=1)
            return _decode(self._compute(args, kwargs, state))["value"]
        if lookup.raw is not None:
            cache.put(digest, lookup.raw, ttl=lookup.ttl_seconds(self.ttl), generation=generation)
            return self._answer(lookup.raw, state, **({"misses": 1} if lookup.missed else {"redis_hits": 1}))
        state.count(self.name, misses=1)
        computing.add(key)
        try:
            raw, stored = self._compute_holding(lookup.lock, digest, args, kwargs, state)
        finally:
            computing.discard(key)
        if stored:
            cache.put(digest, raw, ttl=self.ttl, generation=generation)
        return _decode(raw)["value"]

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The Redis key of this call's entry."""
        return memo_key(self.name, self.version, self._digest(args, kwargs))

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Remove this call's entry from Redis and from every process's LRU; True if Redis held it."""
        digest = self._digest(args, kwargs)
        pipe = redis_client().pipeline(transaction=False)
        pipe.delete(memo_key(self.name, self.version, digest))
        pipe.delete(memo_lock_key(self.name, self.version, digest))
        pipe.publish(memo_invalidate_channel(), json.dumps({"function": self.name, "digest": digest}))
        removed, _, _ = pipe.execute()
        # After the delete: a thread of this process that read the old value before it cannot store it now.
        _drop_local(self.name, digest)
        return bool(removed)

    def clear(self) -> int:
        """Remove every entry of this function, all versions, everywhere; returns how many Redis held."""
        return memo_clear(self.name)

    def local_clear(self) -> None:
        """Forget this process's copies only (the entries in Redis stay)."""
        _drop_local(self.name, None)

    def stats(self) -> MemoStats:
        """This function's statistics over every process (this one's counters flushed first)."""
        return memo_stats([self.name])[self.name]

    def _digest(self, args: tuple, kwargs: dict[str, Any]) -> str:
        """sha256 of the canonical JSON of the bound arguments: f(1) and f(x=1) are one entry."""
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            canonical = json.dumps(
                bound.arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            )
        except (TypeError, ValueError) as exc:
            raise TypeError(f"memoized function {self.name}: arguments must be JSON-serialisable ({exc})") from None
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _encode(self, value: Any, compute_ms: float) -> bytes:
        try:
            return json.dumps(
                {"value": value, "compute_ms": round(compute_ms, 3)},
                separators=(",", ":"),
                ensure_ascii=False,
                allow_nan=False,
            ).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"memoized function {self.name}: its result must be JSON-serialisable ({exc})") from None

    def _answer(self, raw: bytes, state: "_ProcessState", **counts: int) -> Any:
        entry = _decode(raw)
        state.count(self.name, saved_ms=entry["compute_ms"], **counts)
        return entry["value"]

    def _compute(self, args: tuple, kwargs: dict[str, Any], state: "_ProcessState") -> bytes:
        started = time.perf_counter()
        try:
            value = self.fn(*args, **kwargs)
        finally:
            compute_ms = (time.perf_counter() - started) * 1000
            state.count(self.name, computations=1, compute_ms=compute_ms)
        return self._encode(value, compute_ms)

    def _find_or_lock(self, digest: str) -> "_Lookup":
        """The entry from Redis, or the lock to compute it, waiting while another process computes."""
        client = redis_client()
        key = memo_key(self.name, self.version, digest)
        pipe = client.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        raw, ttl_ms = pipe.execute()
        if raw is not None:
            return _Lookup(raw=raw, ttl_ms=ttl_ms, missed=False)
        lock = ExpiringLock(memo_lock_key(self.name, self.version, digest), ttl_seconds=settings.MEMO_LOCK_TTL_SECONDS)
        pubsub = None
        try:
            while True:
                pipe = client.pipeline(transaction=False)
                lock.queue_acquire(pipe)
                pipe.get(key)
                pipe.pttl(key)
                pipe.pttl(lock.key)
                acquired, raw, ttl_ms, lock_ttl_ms = pipe.execute()
                if raw is not None:
                    if acquired:
                        lock.release()
                    return _Lookup(raw=raw, ttl_ms=ttl_ms, missed=True)
                if acquired:
                    return _Lookup(lock=lock, missed=True)
                if pubsub is None:
                    # Subscribed before the next look, so that a holder finishing in between still wakes us.
                    pubsub = _subscribe(memo_done_channel(self.name, self.version, digest))
                    continue
                # Woken by the holder's message, or by the lock lapsing (PTTL -2: it is already gone).
                if lock_ttl_ms == -1:
                    lock_ttl_ms = lock.ttl_ms
                if lock_ttl_ms > 0:
                    _next_message(pubsub, timeout=lock_ttl_ms / 1000 + LAPSE_MARGIN_SECONDS)
        finally:
            if pubsub is not None:
                pubsub.close()

    def _compute_holding(
        self, lock: ExpiringLock, digest: str, args: tuple, kwargs: dict[str, Any], state: "_ProcessState"
    ) -> tuple[bytes, bool]:
        """Compute under the lock, store and announce the value; returns it and whether Redis took it."""
        channel = memo_done_channel(self.name, self.version, digest)
        try:
            with lock.kept_alive():
                raw = self._compute(args, kwargs, state)
        except BaseException:
            _announce_failure(lock, channel)
            raise
        pipe = redis_client().pipeline(transaction=False)
        pipe.eval(
            STORE_IF_HELD,
            2,
            memo_key(self.name, self.version, digest),
            lock.key,
            lock.token,
            raw,
            max(1, int(self.ttl * 1000)),
            channel,
        )
        # A computation is a moment worth reporting at once; the counters ride along in the same round trip.
        drained = state.drain()
        _queue_increments(pipe, drained)
        try:
            stored = bool(pipe.execute()[0])
        except redis.RedisError:
            logger.warning("memoized function %s: could not store a computed value", self.name, exc_info=True)
            state.restore(drained)
            return raw, False
        return raw, stored


@dataclass(frozen=True)
class _Lookup:
    missed: bool
    raw: bytes | None = None
    ttl_ms: int = 0
    lock: ExpiringLock | None = None

    def ttl_seconds(self, default: float) -> float:
        """How long the entry has left in Redis (PTTL: -1 no expiry, -2 already gone)."""
        if self.ttl_ms == -1:
            return default
        return max(self.ttl_ms, 0) / 1000


def _decode(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)


def _announce_failure(lock: ExpiringLock, channel: str) -> None:
    """Release the lock and wake the waiters, so that one of them computes at once (best effort)."""
    pipe = redis_client().pipeline(transaction=False)
    lock.queue_release(pipe)
    pipe.publish(channel, "failed")
    try:
        pipe.execute()
    except redis.RedisError:
        logger.warning("could not release %s after a failed computation; it lapses on its own", lock.key)


def _subscribe(channel: str) -> redis.client.PubSub:
    """A subscription that Redis has confirmed: every message published from now on will arrive."""
    pubsub = redis_client().pubsub()
    try:
        pubsub.subscribe(channel)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_SECONDS
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return pubsub
        raise redis.TimeoutError(f"no confirmation of the subscription to {channel}")
    except BaseException:
        pubsub.close()
        raise


def _next_message(pubsub: redis.client.PubSub, *, timeout: float) -> dict[str, Any] | None:
    """Block until a message arrives on the subscription or `timeout` seconds pass (None)."""
    deadline = time.monotonic() + timeout
    # get_message sets its own socket timeout for the wait, so a long wait is not cut by the client's.
    while (remaining := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=remaining)
        if message is not None and message["type"] == "message":
            return message
    return None


def _queue_increments(pipe: redis.client.Pipeline, counts: dict[str, Counter]) -> None:
    for name, deltas in counts.items():
        key = memo_stats_key(name)
        for field, delta in deltas.items():
            if not delta:
                continue
            if field in COUNTER_FIELDS:
                pipe.hincrby(key, field, int(delta))
            else:
                pipe.hincrbyfloat(key, field, float(delta))


class _ProcessState:
    """What one process keeps: its LRUs, its counters not yet in Redis, and its invalidation listener."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._caches: dict[tuple[str, str], BoundedLRU] = {}
        self._pending: dict[str, Counter] = {}
        self._listener: threading.Thread | None = None
        self._subscribed = threading.Event()

    def cache_for(self, fn: Memoized) -> BoundedLRU:
        cache = self._caches.get((fn.name, fn.version))
        if cache is None:
            with self._lock:
                cache = self._caches.setdefault(
                    (fn.name, fn.version),
                    BoundedLRU(
                        max_entries=fn.max_entries if fn.max_entries is not None else settings.MEMO_LRU_MAX_ENTRIES,
                        max_bytes=fn.max_bytes if fn.max_bytes is not None else settings.MEMO_LRU_MAX_BYTES,
                    ),
                )
        return cache

    def drop(self, name: str | None, digest: str | None) -> None:
        """Drop a function's entry (or all its entries, or every function's) from the LRUs."""
        for (cached_name, _), cache in list(self._caches.items()):
            if name is None or cached_name == name:
                if digest is None:
                    cache.clear()
                else:
                    cache.discard(digest)

    def count(self, name: str, **deltas: float) -> None:
        with self._lock:
            self._pending.setdefault(name, Counter()).update(deltas)

    def drain(self) -> dict[str, Counter]:
        """Take the counters not yet in Redis (give them back with `restore` if the write fails)."""
        with self._lock:
            drained, self._pending = self._pending, {}
        return drained

    def restore(self, drained: dict[str, Counter]) -> None:
        with self._lock:
            for name, deltas in drained.items():
                self._pending.setdefault(name, Counter()).update(deltas)

    def flush_stats(self) -> None:
        drained = self.drain()
        if not drained:
            return
        pipe = redis_client().pipeline(transaction=False)
        _queue_increments(pipe, drained)
        try:
            pipe.execute()
        except redis.RedisError:
            logger.warning("could not flush memoization statistics; keeping them for the next flush")
            self.restore(drained)

    def ensure_listening(self) -> None:
        if self._listener is not None and self._listener.is_alive():
            return
        with self._lock:
            if self._listener is not None and self._listener.is_alive():
                return
            self._listener = threading.Thread(target=self._listen, name="memo-listener", daemon=True)
            self._listener.start()
        # Nothing enters the LRU before the subscription stands, or an invalidation could pass it by.
        self._subscribed.wait(SUBSCRIBE_TIMEOUT_SECONDS)

    def _listen(self) -> None:
        missed_some = False
        while True:
            pubsub = None
            try:
                pubsub = _subscribe(memo_invalidate_channel())
                if missed_some:
                    # Invalidations published while the subscription was down never reach us.
                    self.drop(None, None)
                self._subscribed.set()
                next_flush = time.monotonic() + STATS_FLUSH_SECONDS
                while True:
                    message = _next_message(pubsub, timeout=max(0.0, next_flush - time.monotonic()))
                    if message is not None:
                        invalidation = json.loads(message["data"])
                        self.drop(invalidation["function"], invalidation["digest"])
                    if time.monotonic() >= next_flush:
                        self.flush_stats()
                        next_flush = time.monotonic() + STATS_FLUSH_SECONDS
            except Exception:
                logger.exception("memo listener lost its subscription; subscribing again")
                missed_some = True
                time.sleep(1)
            finally:
                if pubsub is not None:
                    pubsub.close()


_state: _ProcessState | None = None
_state_lock = threading.Lock()
_this_thread = threading.local()


def _process_state() -> _ProcessState:
    """This process's state; a forked child starts its own (empty LRUs and counters, its own listener)."""
    global _state
    state = _state
    if state is None or state.pid != os.getpid():
        with _state_lock:
            if _state is None or _state.pid != os.getpid():
                _state = _ProcessState()
            state = _state
    state.ensure_listening()
    return state


def _renew_state_lock_in_child() -> None:
    # A fork while another thread held the lock would leave the child's copy locked for good.
    global _state_lock
    _state_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_state_lock_in_child)


def _existing_state() -> _ProcessState | None:
    """This process's state if it has one (a process that never called a memoized function has none)."""
    state = _state
    return state if state is not None and state.pid == os.getpid() else None


def _drop_local(name: str, digest: str | None) -> None:
    state = _existing_state()
    if state is not None:
        state.drop(name, digest)


def _computing_in_this_thread() -> set[str]:
    computing = getattr(_this_thread, "computing", None)
    if computing is None:
        computing = _this_thread.computing = set()
    return computing


_registry: dict[str, Memoized] = {}
_registry_lock = threading.Lock()


def memoize(
    *,
    ttl: float,
    version: str | int = "1",
    name: str | None = None,
    max_entries: int | None = None,
    max_bytes: int | None = None,
) -> Callable[[Callable[..., Any]], Memoized]:
    """Memoize a function of JSON arguments and result for `ttl` seconds, shared by every process.

    `name` defaults to `module.qualname`; a new `version` leaves the old entries unreachable.
    `max_entries` and `max_bytes` bound this process's LRU of the function (default: settings).
    """
    if ttl <= 0:
        raise ValueError("memoize: ttl must be more than 0 seconds")
    version = str(version)
    if not VERSION_PATTERN.match(version):
        raise ValueError(f"memoize: version {version!r} must match {VERSION_PATTERN.pattern}")

    def decorate(fn: Callable[..., Any]) -> Memoized:
        memoized = Memoized(
            fn,
            name=name or f"{fn.__module__}.{fn.__qualname__}",
            version=version,
            ttl=ttl,
            max_entries=max_entries,
            max_bytes=max_bytes,
        )
        _register(memoized)
        return memoized

    return decorate


def _register(memoized: Memoized) -> None:
    if not NAME_PATTERN.match(memoized.name) or memoized.name in RESERVED_NAMES:
        raise ValueError(
            f"memoize: name {memoized.name!r} must match {NAME_PATTERN.pattern} and not be one of "
            f"{sorted(RESERVED_NAMES)}"
        )
    with _registry_lock:
        existing = _registry.get(memoized.name)
        # Re-importing the same module (autoreload, tests) declares the same function again: fine.
        if existing is not None and _qualified_name(existing.fn) != _qualified_name(memoized.fn):
            raise ValueError(f"memoize: the name {memoized.name!r} is already taken by {_qualified_name(existing.fn)}")
        _registry[memoized.name] = memoized


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def memo_functions() -> list[Memoized]:
    """Every memoized function this process has imported, by name."""
    with _registry_lock:
        return sorted(_registry.values(), key=lambda memoized: memoized.name)


def memo_clear(name: str) -> int:
    """Remove every entry of the named function, all versions, and have every process drop its copies.

    Returns how many entries Redis held. Computations in flight lose their lock, so they cannot
    store a value computed before the clear.
    """
    client = redis_client()
    removed = redis_delete_matching(redis_key("memo", name, "*"), client=client)
    redis_delete_matching(redis_key("memo", "lock", name, "*"), client=client)
    client.publish(memo_invalidate_channel(), json.dumps({"function": name, "digest": None}))
    _drop_local(name, None)
    return removed


def memo_stats(names: Iterable[str] | None = None) -> dict[str, MemoStats]:
    """Each function's statistics over every process (default: the functions this process declares).

    This process's counters not yet flushed are written first, in the same round trip.
    """
    names = [memoized.name for memoized in memo_functions()] if names is None else list(names)
    state = _existing_state()
    drained = state.drain() if state is not None else {}
    pipe = redis_client().pipeline(transaction=False)
    _queue_increments(pipe, drained)
    for name in names:
        pipe.hgetall(memo_stats_key(name))
    try:
        replies = pipe.execute()
    except redis.RedisError:
        if state is not None:
            state.restore(drained)
        raise
    stored = replies[len(replies) - len(names) :]
    return {name: _stats_from_hash(fields) for name, fields in zip(names, stored, strict=True)}


def _stats_from_hash(stored: dict[bytes, bytes]) -> MemoStats:
    values: dict[str, float] = {}
    for field, value in stored.items():
        field_name = field.decode()
        if field_name in COUNTER_FIELDS:
            values[field_name] = int(value)
        elif field_name in TIMING_FIELDS:
            values[field_name] = float(value)
    return MemoStats(**values)
