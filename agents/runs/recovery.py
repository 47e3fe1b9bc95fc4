"""The sweeper: PostgreSQL is the truth, so whatever Redis or a worker lost is found here and redone.

Run by Celery beat every few seconds. Each pass is idempotent, and every dispatch it makes is
guarded by the claim, so overlapping passes or an extra message never run a run twice.
"""

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from agentplatform.celery import app
from agents.models import Agent, Run, RunStatus
from agents.runs.dispatch import messages_due, run_dispatch
from agents.runs.finish import followers_orphaned, runs_expire, worker_lost
from scheduling.backlog import agent_field, backlog_reset, tier_field
from scheduling.concurrency import slots_wake
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    expired: int = 0
    requeued: int = 0
    failed: int = 0
    redispatched: int = 0
    escalated: int = 0
    woken: int = 0
    settled_followers: int = 0


def sweep() -> SweepReport:
    """One pass of every recovery rule."""
    requeued, failed = sweep_lost_leases()
    report = SweepReport(
        expired=sweep_expired(),
        requeued=requeued,
        failed=failed,
        redispatched=sweep_lost_messages(),
        escalated=sweep_escalations(),
        woken=sweep_waiting_for_slots(),
        settled_followers=followers_orphaned(settings.SWEEP_BATCH),
    )
    backlog_recount()
    if report != SweepReport():
        logger.info("sweep: %s", report)
    return report


def sweep_expired() -> int:
    """Queued runs past their expiry end `expired` without running."""
    runs = Run.objects.select_related("agent").filter(status=RunStatus.QUEUED, expires_at__lt=timezone.now())
    return len(runs_expire(runs[: settings.SWEEP_BATCH]))


def sweep_lost_leases() -> tuple[int, int]:
    """Running runs whose lease expired (their worker died): queue them again, or fail them if out of attempts."""
    requeued = failed = 0
    runs = Run.objects.select_related("agent").filter(status=RunStatus.RUNNING, lease_expires_at__lt=timezone.now())
    for run in runs[: settings.SWEEP_BATCH]:
        if worker_lost(run):
            requeued += run.status == RunStatus.QUEUED
            failed += run.status == RunStatus.FAILED
    return requeued, failed


def sweep_lost_messages() -> int:
    """Queued runs whose message is gone (Redis flushed or restarted, a worker killed) are dispatched again."""
    settled = timezone.now() - timedelta(seconds=settings.SWEEP_QUEUED_AFTER_SECONDS)
    runs = list(
        Run.objects.select_related("agent")
        # A follower has no message of its own: it finishes with the run it follows.
        .filter(status=RunStatus.QUEUED, submitted_at__lt=settled, follows__isnull=True)
        .order_by("submitted_at")[: settings.SWEEP_BATCH]
    )
    overdue = time.time() - settings.SWEEP_MESSAGE_OVERDUE_SECONDS
    due = messages_due([str(run.pk) for run in runs])
    lost = [run for run, when in zip(runs, due, strict=True) if when is None or when < overdue]
    if lost:
        queues_declare()
        run_dispatch(lost)
    return len(lost)


def sweep_escalations() -> int:
    """Standard runs still queued past their escalation point are also offered to the critical pool."""
    now = timezone.now()
    runs = list(
        Run.objects.filter(
            status=RunStatus.QUEUED, tier=Tier.STANDARD, escalated_at__isnull=True, escalate_at__lte=now
        ).order_by("escalate_at")[: settings.SWEEP_BATCH]
    )
    if not runs:
        return 0
    Run.objects.filter(pk__in=[run.pk for run in runs], escalated_at__isnull=True).update(escalated_at=now)
    run_dispatch(runs, tier=Tier.CRITICAL)
    return len(runs)


def sweep_waiting_for_slots() -> int:
    """Runs waiting for a concurrency slot that freed without a release (a killed worker's lease ran out)."""
    woken = 0
    for agent in Agent.objects.filter(concurrency_limit__isnull=False):
        run_ids = slots_wake(agent=agent.name, limit=agent.concurrency_limit)
        if run_ids:
            run_dispatch(Run.objects.filter(pk__in=run_ids, status=RunStatus.QUEUED))
            woken += len(run_ids)
    return woken


def queues_declare() -> None:
    """Declare the tier queues and their bindings again: a flushed Redis forgets them, and publishing needs them."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in app.conf.task_queues:
            queue(channel).declare()


def backlog_recount() -> None:
    """Set the backlog counters that admission reads to the database's count of queued runs."""
    queued = Run.objects.filter(status=RunStatus.QUEUED, follows__isnull=True)
    counts = {tier_field(tier): total for tier, total in queued.values_list("tier").annotate(total=Count("pk"))}
    for name, total in queued.values_list("agent__name").annotate(total=Count("pk")):
        counts[agent_field(name)] = total
    backlog_reset(counts)
