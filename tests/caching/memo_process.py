"""Another process calling memoized functions, for the multi-process tests.

    python -m tests.caching.memo_process hold KEY    # computes `blocking(KEY)`, which may sleep for long
    python -m tests.caching.memo_process watch KEY   # calls `current(KEY)` in a loop, noting what it returns

Started with the test run's environment (tests.conftest.worker_env) and the repository as cwd.
"""

import os
import sys
import time

import django

from agentplatform.redis_client import redis_client, redis_key
from caching.memoize import memoize

WATCH_SECONDS = 30
WATCH_PAUSE_SECONDS = 0.02


def computations_key(key: str) -> str:
    return redis_key("test", "memo-computations", key)


def holder_pid_key(key: str) -> str:
    return redis_key("test", "memo-holder", key)


def sleep_key(key: str) -> str:
    return redis_key("test", "memo-sleep", key)


def value_key(key: str) -> str:
    return redis_key("test", "memo-value", key)


def seen_key(key: str) -> str:
    return redis_key("test", "memo-seen", key)


@memoize(ttl=60, name="tests.memo_process.blocking")
def blocking(key: str) -> dict:
    """Counts its computations, notes its process id, then sleeps as long as Redis says under `key`."""
    client = redis_client()
    client.incr(computations_key(key))
    client.set(holder_pid_key(key), os.getpid())
    time.sleep(float(client.get(sleep_key(key)) or 0))
    return {"pid": os.getpid()}


@memoize(ttl=60, name="tests.memo_process.current")
def current(key: str) -> str | None:
    """What Redis holds under `key` at the time of computing."""
    value = redis_client().get(value_key(key))
    return value.decode() if value is not None else None


def watch(key: str) -> None:
    """Call `current(key)` again and again for a while, writing each answer to Redis."""
    client = redis_client()
    deadline = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < deadline:
        client.set(seen_key(key), current(key) or "")
        time.sleep(WATCH_PAUSE_SECONDS)


def main(mode: str, key: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")
    django.setup()
    if mode == "hold":
        blocking(key)
    elif mode == "watch":
        watch(key)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
