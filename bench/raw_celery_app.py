"""Raw Celery, as bench/throughput.py measures the platform against it: one no-op task, results in Redis.

Celery's defaults otherwise (prefork, prefetch multiplier 4, acknowledgement before execution, JSON),
on the platform's Redis, with every key under its own prefix so that it never meets the platform's.
"""

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Under the benchmark's prefix, so that the throw-away clean-up removes whatever is left behind.
KEY_PREFIX = f"{os.environ.get('REDIS_KEY_PREFIX', 'apbench:')}raw:"

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
