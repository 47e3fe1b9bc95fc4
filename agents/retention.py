"""Runs do not pile up forever: finished runs are deleted once they finished RUN_RETENTION_DAYS ago.

The purge runs on the housekeeping worker every RUN_PURGE_INTERVAL_SECONDS. It deletes by primary key,
RUN_PURGE_BATCH rows at a time, each batch its own short transaction, so it never locks the table and
never holds back the runs being written meanwhile; a pass stops after PURGE_TIME_BUDGET_SECONDS and the
next one goes on. Runs that pointed at a deleted run (its children, its followers) and a schedule's
`last_run` keep their rows, with the link emptied. The last pass is noted in Redis for the admin.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Run, RunStatus

logger = logging.getLogger(__name__)

PURGE_TASK = "agents.purge_runs"
# A pass stops starting batches after this long; the task's limits leave room for the batch under way.
PURGE_TIME_BUDGET_SECONDS = 60.0
PURGE_SOFT_TIME_LIMIT_SECONDS = 120
PURGE_TIME_LIMIT_SECONDS = 150


@dataclass(frozen=True)
class PurgeReport:
    """One pass: when, how many runs it deleted, the finishing time they were older than, and whether
    it reached the end (False: the time budget ran out first, the next pass goes on)."""

    at: datetime
    deleted: int
    cutoff: datetime | None
    complete: bool


def retention_last_purge_key() -> str:
    return redis_key("retention", "last")


def retention_cutoff(*, now: datetime, days: int) -> datetime | None:
    """Runs that finished before this are purged; None when runs are kept forever (`days` 0)."""
    return now - timedelta(days=days) if days > 0 else None


def runs_purge(
    *,
    days: int | None = None,
    batch: int | None = None,
    budget_seconds: float = PURGE_TIME_BUDGET_SECONDS,
    now: datetime | None = None,
) -> PurgeReport:
    """Delete finished runs that finished more than `days` (RUN_RETENTION_DAYS) ago, oldest first,
    `batch` (RUN_PURGE_BATCH) at a time, until none is left or `budget_seconds` have passed."""
    now = now or timezone.now()
    days = settings.RUN_RETENTION_DAYS if days is None else days
    batch = max(1, settings.RUN_PURGE_BATCH if batch is None else batch)
    cutoff = retention_cutoff(now=now, days=days)
    if cutoff is None:
        return PurgeReport(at=now, deleted=0, cutoff=None, complete=True)
    began, deleted, complete = time.monotonic(), 0, False
    old = Run.objects.filter(status__in=RunStatus.terminal(), finished_at__lt=cutoff)
    while True:
        # Oldest first, along the index on finished_at; then by key alone, so each batch locks only its rows.
        ids = list(old.order_by("finished_at").values_list("pk", flat=True)[:batch])
        if ids:
            with transaction.atomic():
                # Only rows still finished and old: a row is never deleted on a stale reading.
                removed, _ = old.filter(pk__in=ids).only("pk").delete()
            deleted += removed
        if len(ids) < batch:
            complete = True
            break
        if time.monotonic() - began >= budget_seconds:
            break
    report = PurgeReport(at=now, deleted=deleted, cutoff=cutoff, complete=complete)
    _note(report)
    if deleted:
        logger.info("purged %d runs finished before %s%s", deleted, cutoff, "" if complete else " (more left)")
    return report


def _note(report: PurgeReport) -> None:
    try:
        noted = {**asdict(report), "at": report.at.isoformat(), "cutoff": report.cutoff and report.cutoff.isoformat()}
        redis_client().set(retention_last_purge_key(), json.dumps(noted))
    except redis.RedisError as exc:
        logger.warning("could not note the last purge (%s)", exc)


def retention_last_purge() -> dict[str, Any] | None:
    """The last pass as noted (at, deleted, cutoff as ISO text, complete); None if none is known."""
    try:
        raw = redis_client().get(retention_last_purge_key())
    except redis.RedisError:
        return None
    return json.loads(raw) if raw else None
