"""The sweeper: PostgreSQL is the truth, so whatever Redis or a worker lost is found here and redone.

Run by Celery beat every few seconds, on the housekeeping worker, one pass at a time (a Redis lock).
Each pass is idempotent, and every dispatch it makes is guarded by the claim, so an extra message
never runs a run twice; the sweeper still sends one only for a run whose message is gone.
"""

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone
from redis.exceptions import LockError

from agentplatform.celery import app
from agentplatform.metrics import sweep_record
from agentplatform.redis_client import redis_client, redis_key
from agents.models import IN_FLIGHT, Agent, Run, RunStatus
from agents.runs.cancellation import orphans_cancel
from agents.runs.delegation import parents_stranded, runs_wake_due
from agents.runs.dispatch import messages_confirmed, messages_due, messages_found, run_dispatch
from agents.runs.finish import followers_orphaned, runs_expire, worker_lost
from scheduling.backlog import agent_field, backlog_reset, tier_field, user_field
from scheduling.concurrency import slots_wake, waiters_key
from scheduling.sla import escalation_room
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

# The sweep task's hard time limit: a pass whose process was killed holds the lock no longer.
SWEEP_TIME_LIMIT_SECONDS = 60


@dataclass(frozen=True)
class SweepReport:
    expired: int = 0
    requeued: int = 0
    failed: int = 0
    redispatched: int = 0
    escalated: int = 0
    woken: int = 0
    settled_followers: int = 0
    # Multi-agent work: waiting runs past their wake-up time, and parents whose children all ended uncounted.
    awoken: int = 0
    parents_resumed: int = 0
    # Runs still in flight below a cancelled run: its cancel was cut short.
    orphans_cancelled: int = 0


def sweep_lock_key() -> str:
    return redis_key("sweep", "lock")


def sweep_suspects_key() -> str:
    return redis_key("sweep", "suspects")


def sweep() -> SweepReport:
    """One pass of every recovery rule, after any pass still under way (skipped if that one takes too long).

    Passes never overlap: two at once would both re-send the same lost message.
    """
    lock = redis_client().lock(
        sweep_lock_key(), timeout=SWEEP_TIME_LIMIT_SECONDS, blocking_timeout=settings.SWEEP_INTERVAL_SECONDS
    )
    if not lock.acquire():
        logger.warning("sweep skipped: the previous pass still runs")
        return SweepReport()
    try:
        return _sweep()
    finally:
        try:
            lock.release()
        except LockError:
            logger.warning("sweep: the pass outlived its lock")


def _sweep() -> SweepReport:
    requeued, failed = sweep_lost_leases()
    report = SweepReport(
        expired=sweep_expired(),
        requeued=requeued,
        failed=failed,
        redispatched=sweep_lost_messages(),
        escalated=sweep_escalations(),
        woken=sweep_waiting_for_slots(),
        settled_followers=followers_orphaned(settings.SWEEP_BATCH),
        awoken=runs_wake_due(settings.SWEEP_BATCH),
        parents_resumed=parents_stranded(settings.SWEEP_BATCH),
        orphans_cancelled=orphans_cancel(settings.SWEEP_BATCH),
    )
    backlog_recount()
    sweep_record(report)
    if report != SweepReport():
        logger.info("sweep: %s", report)
    return report


def sweep_expired() -> int:
    """Queued runs past their expiry end `expired` without running."""
    runs = Run.objects.select_related("agent").filter(status=RunStatus.QUEUED, expires_at__lt=timezone.now())
    return len(runs_expire(runs[: settings.SWEEP_BATCH]))


def sweep_lost_leases() -> tuple[int, int]:
    """Running runs whose lease expired (their worker died): queue them again, or fail them once they have
    lost too many workers."""
    requeued = failed = 0
    runs = Run.objects.select_related("agent").filter(status=RunStatus.RUNNING, lease_expires_at__lt=timezone.now())
    for run in runs[: settings.SWEEP_BATCH]:
        if worker_lost(run):
            requeued += run.status == RunStatus.QUEUED
            failed += run.status == RunStatus.FAILED
    return requeued, failed


def sweep_lost_messages() -> int:
    """Queued runs whose message is gone (Redis flushed or restarted, a publish that never happened) are
    dispatched again, once. A message waiting in a queue, however long, or held by a worker is left alone."""
    settled = timezone.now() - timedelta(seconds=settings.SWEEP_QUEUED_AFTER_SECONDS)
    runs = list(
        Run.objects.select_related("agent")
        # A follower has no message of its own: it finishes with the run it follows.
        .filter(status=RunStatus.QUEUED, submitted_at__lt=settled, follows__isnull=True)
        .order_by("submitted_at")[: settings.SWEEP_BATCH]
    )
    unaccounted = _unaccounted(runs)
    if unaccounted:
        # A worker drops a run's marker only after its claim committed, so a run still queued now, read
        # after its marker was found missing, was not claimed in between.
        queued = set(
            Run.objects.filter(
                pk__in=[run.pk for run in unaccounted], status=RunStatus.QUEUED, follows__isnull=True
            ).values_list("pk", flat=True)
        )
        unaccounted = [run for run in unaccounted if run.pk in queued]
    found = messages_found() if unaccounted else set()
    if found:
        messages_confirmed(found, marked=[str(run.pk) for run in unaccounted if str(run.pk) in found])
    lost = [run for run in unaccounted if str(run.pk) not in found]
    gone = _lost_long_enough(lost)
    resent = [run for run in lost if str(run.pk) in gone]
    if resent:
        queues_declare()
        run_dispatch(resent)
    return len(resent)


def _unaccounted(runs: Sequence[Run]) -> list[Run]:
    """The queued runs that no recent marker shows a message for, and that wait for no concurrency slot.

    A marker older than SWEEP_MESSAGE_OVERDUE_SECONDS proves nothing either way (the message may sit in
    a long queue, or its publisher may have died before sending it): the broker itself is read for those.
    """
    if not runs:
        return []
    overdue = time.time() - settings.SWEEP_MESSAGE_OVERDUE_SECONDS
    due = messages_due([str(run.pk) for run in runs])
    unmarked = [run for run, when in zip(runs, due, strict=True) if when is None or when < overdue]
    # A run waiting for a slot of its agent has no message on purpose: the slot's release wakes it.
    limited: dict[str, list[Run]] = defaultdict(list)
    for run in unmarked:
        if run.agent.concurrency_limit:
            limited[run.agent.name].append(run)
    if not limited:
        return unmarked
    pipe = redis_client().pipeline(transaction=False)
    for agent, waiting in limited.items():
        pipe.zmscore(waiters_key(agent), [str(run.pk) for run in waiting])
    waiting_ids = {
        run.pk
        for waiting, scores in zip(limited.values(), pipe.execute(), strict=True)
        for run, score in zip(waiting, scores, strict=True)
        if score is not None
    }
    return [run for run in unmarked if run.pk not in waiting_ids]


def _lost_long_enough(lost: Sequence[Run]) -> set[str]:
    """The ids of the runs of `lost` found without a message on every pass for SWEEP_QUEUED_AFTER_SECONDS.

    A run is queued again a moment before its new message is published (a retry, a hand-back, a
    follower taking over): one look may fall in between, two looks that far apart do not. The runs found
    lost are kept with when they were first found so; any other is forgotten.
    """
    client, key, now = redis_client(), sweep_suspects_key(), time.time()
    ids = [str(run.pk) for run in lost]
    if not ids:
        client.delete(key)
        return set()
    since = {run_id: first or now for run_id, first in zip(ids, client.zmscore(key, ids), strict=True)}
    gone = {run_id for run_id, first in since.items() if first <= now - settings.SWEEP_QUEUED_AFTER_SECONDS}
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    if suspects := {run_id: first for run_id, first in since.items() if run_id not in gone}:
        pipe.zadd(key, suspects)
    pipe.execute()
    return gone


def sweep_escalations() -> int:
    """Standard runs still queued past their escalation point are also offered to the critical pool, as many
    as it has idle processes: escalation never makes critical work wait."""
    now = timezone.now()
    pool = settings.WORKER_CONCURRENCY_CRITICAL
    due = list(
        Run.objects.filter(
            status=RunStatus.QUEUED, tier=Tier.STANDARD, escalated_at__isnull=True, escalate_at__lte=now
        ).order_by("escalate_at")[: min(pool, settings.SWEEP_BATCH)]
    )
    if not due:
        return 0
    runs = due[: escalation_room(pool_size=pool, busy=critical_pool_busy())]
    if not runs:
        return 0
    Run.objects.filter(pk__in=[run.pk for run in runs], escalated_at__isnull=True).update(escalated_at=now)
    run_dispatch(runs, tier=Tier.CRITICAL)
    return len(runs)


def critical_pool_busy() -> int:
    """Runs that hold or wait for a process of the critical pool: critical runs and escalated ones, in flight.

    An escalated run may be running on the standard pool instead; counting it errs on critical work's side.
    """
    return (
        Run.objects.filter(IN_FLIGHT, follows__isnull=True)
        .filter(Q(tier=Tier.CRITICAL) | Q(escalated_at__isnull=False))
        .count()
    )


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
    by_user = queued.filter(submitted_by__isnull=False).values_list("submitted_by", "tier").annotate(total=Count("pk"))
    for user, tier, total in by_user:
        counts[user_field(user, tier)] = total
    backlog_reset(counts)
