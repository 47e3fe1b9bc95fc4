"""The naive Celery set-up the platform is measured against: one queue and one pool for every tier."""

import os
import time
from functools import cache

import redis
from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("REDIS_KEY_PREFIX", "apbench:")
QUEUE = "naive"
DONE_KEY = f"{PREFIX}naive:done"

app = Celery("naive", broker=REDIS_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
)


@cache
def finish_log() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


@app.task(name="naive.spin")
def spin(ms: float, key: str) -> None:
    """The same CPU work as the platform's spin agent; then note when it finished."""
    deadline = time.process_time() + ms / 1000
    while time.process_time() < deadline:
        pass
    finish_log().hset(DONE_KEY, key, time.time())
