"""The Celery app: one queue per tier and one for housekeeping, routes, and worker defaults."""

import contextlib
import gc
import os
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.signals import task_prerun, worker_process_init
from django.conf import settings
from django.db import close_old_connections, connections
from kombu import Queue

# Registers the worker's `inspect conf` and `inspect report` answers (Flower's worker page) with secrets masked.
from agentplatform import worker_inspect  # noqa: F401
from scheduling.tiers import Tier

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")

# The platform's own work (the sweeper, schedule firings) has a queue and a worker of its own: recovery,
# expiry and escalation must go on while every pool is busy with agent work. No run is ever sent there.
HOUSEKEEPING_QUEUE = "housekeeping"

app = Celery("agentplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")

app.conf.update(
    task_queues=[
        *(Queue(tier.queue, routing_key=tier.queue) for tier in Tier),
        Queue(HOUSEKEEPING_QUEUE, routing_key=HOUSEKEEPING_QUEUE),
    ],
    task_default_queue=Tier.STANDARD.queue,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    # The Run row is the result store.
    task_ignore_result=True,
    # A message is acknowledged only once its run is recorded; a killed worker's message comes back.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # Queues and bookkeeping keys share the deployment's prefix with every other key.
        "global_keyprefix": settings.REDIS_KEY_PREFIX,
        # Redelivery of an unacknowledged message waits this long; recovery of a run does not
        # depend on it (the run's lease does), so it only needs to exceed the longest countdown.
        "visibility_timeout": 3600,
    },
    beat_scheduler="django_celery_beat.schedulers:DatabaseScheduler",
    beat_schedule={
        "sweep": {
            "task": "agents.sweep",
            "schedule": settings.SWEEP_INTERVAL_SECONDS,
            "options": {"queue": HOUSEKEEPING_QUEUE},
        },
        # Finished runs older than RUN_RETENTION_DAYS (agents/retention.py).
        "purge-runs": {
            "task": "agents.purge_runs",
            "schedule": settings.RUN_PURGE_INTERVAL_SECONDS,
            "options": {"queue": HOUSEKEEPING_QUEUE},
        },
    },
    # Per-task events feed Flower's task views; they cost every task a few publishes, so they are
    # off unless asked for (Flower shows workers and queues either way).
    worker_send_task_events=settings.WORKER_SEND_TASK_EVENTS,
)
# Celery's Django fixup closes every database connection before and after each task and, in a
# prefork pool, tears down Django's connection pool with them: a new connection per task. With a
# reuse count it does so only every few thousand tasks; Django's own check, before each task,
# still drops a broken connection (or hands a pooled one back).
app.conf.update(CELERY_DB_REUSE_MAX=settings.WORKER_DB_REUSE_MAX)
app.autodiscover_tasks()


@worker_process_init.connect
def _database_pools_not_inherited(**kwargs: Any) -> None:
    """A new pool process starts without the main process's pooled database connections.

    The main process uses the database too (lease heartbeats, recording what a dead process left),
    and Django's pool of PostgreSQL connections is shared by the whole process: a forked process
    would otherwise take the parent's idle connections, whose sockets the parent still uses, and
    the two would read each other's answers. Their descriptors are closed here (which leaves the
    parent's sockets open) and the pools forgotten; the process opens its own on first use.
    """
    for connection in connections.all(initialized_only=True):
        pools = getattr(type(connection), "_connection_pools", None)
        for pool in (pools or {}).values():
            for pooled in list(getattr(pool, "_pool", ())):
                with contextlib.suppress(Exception):
                    os.close(pooled.fileno())
        if pools:
            pools.clear()
        if connection.connection is not None and getattr(connection.connection, "_pool", None) is not None:
            with contextlib.suppress(Exception):
                os.close(connection.connection.fileno())
            # Forgotten, not closed: closing would hand it back to the parent's pool over the shared socket.
            connection.connection = None


@worker_process_init.connect
def _startup_objects_frozen(**kwargs: Any) -> None:
    """What a pool process inherits lives as long as it does: frozen, the garbage collector stops walking it
    on every full collection (a pause in the middle of a message), and forked pages stay shared."""
    gc.freeze()


@task_prerun.connect
def _drop_unusable_connections(task: Task, **kwargs: Any) -> None:
    # An eagerly applied task runs inside its caller's transaction: leave that connection alone.
    if not getattr(task.request, "is_eager", False):
        close_old_connections()


class PlatformTask(Task):
    """Defaults every platform task shares: late acks, redelivery when a worker dies, no result backend."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True


def platform_task(
    *,
    name: str,
    queue: str,
    soft_time_limit: float | None = None,
    time_limit: float | None = None,
    base: type[Task] = PlatformTask,
    **options: Any,
) -> Callable[[Callable[..., Any]], Task]:
    """The house task decorator: an explicit name and queue, time limits, and PlatformTask's defaults."""
    return app.task(
        bind=True,
        name=name,
        queue=queue,
        soft_time_limit=soft_time_limit,
        time_limit=time_limit,
        base=base,
        **options,
    )
