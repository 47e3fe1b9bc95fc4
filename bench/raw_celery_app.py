"""Raw Celery, as the benchmarks measure the platform against it: a no-op task and a sleeping one,
results in Redis, and the worker that runs them.

Celery's defaults otherwise (prefork, prefetch multiplier 4, acknowledgement before execution, JSON),
on the platform's Redis, with every key under its own prefix so that it never meets the platform's.
"""

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Under the benchmark's prefix, so that the throw-away clean-up removes whatever is left behind.
KEY_PREFIX = f"{os.environ.get('REDIS_KEY_PREFIX', 'apbench:')}raw:"
WORKER = "raw"

# No fixups: Celery would otherwise set up Django (DJANGO_SETTINGS_MODULE is in the benchmark's
# environment) and close database connections around every task, which raw Celery does not pay.
app = Celery("raw", broker=REDIS_URL, backend=REDIS_URL, fixups=[])
app.conf.update(
    broker_transport_options={"global_keyprefix": KEY_PREFIX},
    result_backend_transport_options={"global_keyprefix": KEY_PREFIX},
    broker_connection_retry_on_startup=True,
)


@app.task(name="raw.noop")
def noop() -> None:
    """Nothing: what is left is Celery's own cost per task."""


@app.task(name="raw.sleep")
def sleep(seconds: float) -> tuple[float, float]:
    """Sleep `seconds`; returns the Unix times just before and just after, as the platform stamps an agent's call."""
    started = time.time()
    time.sleep(seconds)
    return started, time.time()


@contextmanager
def raw_worker(processes, *, concurrency: int = 2) -> Iterator[None]:
    """`celery worker -c concurrency --pool prefork` of this app, started by `processes` (bench.stack.Processes)
    and answering ping; on the way out it is stopped and the app's keys are deleted."""
    worker = processes.start(
        [sys.executable, "-m", "celery", "-A", "bench.raw_celery_app", "worker", "-c", str(concurrency),
         "--pool", "prefork", "--without-gossip", "--without-mingle", "-n", f"{WORKER}@%h", "--loglevel", "WARNING"],
        log="raw",
    )  # fmt: skip
    try:
        wait_for_worker()
        yield
    finally:
        processes.stop(worker)
        delete_keys()


def wait_for_worker(seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if any(name.split("@")[0] == WORKER for reply in replies for name in reply):
            return
    raise RuntimeError("the raw Celery worker did not answer ping")


def delete_keys() -> int:
    """Delete the app's queues, bindings and stored results; returns how many keys went."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        for offset in range(0, len(keys), 1000):
            deleted += client.delete(*keys[offset : offset + 1000])
    finally:
        client.close()
    return deleted
