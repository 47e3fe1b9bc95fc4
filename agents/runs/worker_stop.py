"""A worker told to stop hands the runs in progress back to the queue at once.

Celery's warm shutdown (SIGTERM: the process manager stopping a program, `docker stop`, `make up`'s
Ctrl-C) waits for the tasks in progress to finish, which for a run may take as long as its time limit
(an hour for `sleep`); a worker killed sooner leaves its runs `running` until their leases lapse, and
then they count as lost attempts. Instead, when its main process is told to stop, the worker cancels the
messages its pool is executing, as Celery's cold shutdown does: the pool processes are terminated and the
messages stay unacknowledged (Celery gives them back to the broker), without a WorkerLost error. Once
the pool has stopped, every run this worker claimed since it started and still holds is queued again
without counting the attempt and sent in a new message, so another worker takes it whether or not it
gets the old message first (the claim makes the other message harmless). A run whose outcome was
recorded before its process ended is left as it is.
"""

import logging
from datetime import datetime
from typing import Any

from django.db import DatabaseError, close_old_connections
from django.db.models import Q
from django.utils import timezone
from redis import RedisError

from agents.models import Run, RunStatus
from agents.runs.execute import runs_hand_back, spooled_record_all
from agents.runs.lease import pool_processes

logger = logging.getLogger(__name__)


class _Worker:
    """What this module keeps in a worker's main process."""

    # Celery's consumer, which cancels the requests the pool is executing.
    consumer: Any = None
    # When the worker became ready: its runs were claimed after it, an earlier worker's of the same name before.
    ready_at: datetime | None = None
    # Set once the worker was told to stop and cancelled its requests.
    stopping: bool = False


_worker = _Worker()


def runs_hand_back_held(*, worker: str, since: datetime) -> list[Run]:
    """Queue again, without counting the attempt, the runs that `worker` claimed since `since` and still
    holds, and send them in new messages; returns them. Only for a worker whose pool has stopped."""
    # What its processes had finished is recorded, not run again.
    spooled_record_all(worker=worker)
    held = Q(status=RunStatus.RUNNING, worker=worker)
    runs = list(Run.objects.select_related("agent").filter(held, started_at__gte=since))
    if runs:
        runs_hand_back(runs, held=held)
    return runs


def spools_recorded_on_worker_ready(sender: Any, **kwargs: Any) -> None:
    """A worker killed whole (its main process too) left its processes' spools: the next worker of its name,
    on this machine, records what they had finished before their leases lapse and the runs run again."""
    hostname = getattr(sender, "hostname", None)
    if hostname:
        spooled_record_all(worker=hostname, live=set(pool_processes()))


def consumer_on_worker_ready(sender: Any, **kwargs: Any) -> None:
    """Keep the worker's consumer (the sender of worker_ready), which a stop needs, and when it became ready."""
    _worker.consumer, _worker.ready_at = sender, timezone.now()


def cancel_on_worker_shutting_down(sender: Any, how: str = "", **kwargs: Any) -> None:
    """In the main process's signal handler: a warm shutdown cancels the requests in progress.

    A cold shutdown (SIGQUIT, a second Ctrl-C) cancels them itself and sends no worker_shutdown: its
    runs are recovered when their leases lapse.
    """
    consumer = _worker.consumer
    if how != "Warm" or consumer is None or _worker.stopping:
        return
    # Celery's own cancellation, made for signal handlers: it terminates the pool processes running the
    # requests and marks them cancelled, so that their ends are not reported as lost workers and their
    # messages are not acknowledged.
    try:
        consumer.cancel_active_requests()
    except NotImplementedError:
        # A pool that runs tasks in this process (solo, threads) cannot end one: the shutdown waits for them.
        return
    _worker.stopping = True


def hand_back_on_worker_shutdown(sender: Any, **kwargs: Any) -> None:
    """Once the pool has stopped (worker_shutdown, sent by the stopped worker): queue its runs again."""
    worker = getattr(sender, "hostname", None)
    if not _worker.stopping or _worker.ready_at is None or not worker:
        return
    # A connection of this thread that the database has closed meanwhile is dropped, not used.
    close_old_connections()
    try:
        runs = runs_hand_back_held(worker=worker, since=_worker.ready_at)
    except (DatabaseError, RedisError) as exc:
        # Their leases lapse, and the sweeper queues them again.
        logger.warning("%s could not hand its runs back on stopping: %s", worker, exc)
        return
    if runs:
        logger.info("%s stopping: %d runs in progress queued again", worker, len(runs))
