"""Every way a run ends, in one place: succeeded, failed (or queued again to retry), cancelled,
expired, answered from the result cache, finished as a follower.

Each transition writes the final status with the same timings and SLA outcome, stores a result
in the cache, publishes the events, gives up in-flight leadership (settling the followers) and
concurrency slots, and does so in bulk for runs that end together: one UPDATE and one Redis
pipeline for all the runs of a worker's message.

A run that executed has `started_at` (its latest attempt's start), `run_ms` and, from its first
start, `queue_wait_ms`. A run that shared another's outcome (from the cache, or as a follower)
never started: those stay empty, so run-time figures count executions only.

This module stands below the other steps of a run: it never imports `submit` or `coalescing`.
"""

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, F, Q, QuerySet, Value, When
from django.utils import timezone

from agentplatform import events
from agentplatform.metrics import runs_ended_record
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus
from agents.runs.dispatch import run_dispatch
from agents.runs.inflight import leader_take_over, leaders_release
from caching.results import result_cache_get_many, result_cache_store
from scheduling.backlog import agent_field, backlog_add, tier_field
from scheduling.concurrency import slot_release
from scheduling.rate import RateCharge
from scheduling.retries import retry_delay
from scheduling.sla import sla_outcome
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

URGENCY = Case(When(tier=Tier.CRITICAL, then=Value(0)), When(tier=Tier.STANDARD, then=Value(1)), default=Value(2))
TAKEN_OVER_AFTER = frozenset({RunStatus.CANCELLED, RunStatus.EXPIRED})
# Each failed attempt's error stays with its run (`attempt_errors`): the latest this many, tracebacks cut.
ATTEMPT_ERRORS_KEPT = 20
ATTEMPT_TRACEBACK_MAX_CHARS = 4000


@dataclass
class Attempt:
    """How one executed attempt of a claimed run ended: a result, or an error."""

    run: Run
    started_at: datetime
    finished_at: datetime
    run_ms: int | None
    result: Any = None
    error: dict[str, str] | None = None
    retryable: bool = True
    # What the run waits for instead of a result (agents.runs.delegation.Delegation), if it delegated.
    delegation: Any = None
    # The run's log after this attempt (RunContext.log); None keeps the log as it was.
    log: str | None = None

    @property
    def retries_left(self) -> bool:
        return self.retryable and self.run.attempts - self.run.lost_attempts <= self.run.max_retries


def held_by(run: Run) -> Q:
    """The row as long as the claim `run` describes still holds it: not cancelled, not reclaimed.

    A claim is known by its start: heartbeats move the lease, and a later claim has a later start.
    """
    # The runs of one message are claimed together and share the claim's start: the row is named too.
    return Q(pk=run.pk, status=RunStatus.RUNNING, worker=run.worker, started_at=run.started_at)


def _queue_wait_ms(run: Run, started_at: datetime) -> int:
    if run.queue_wait_ms is not None:
        return run.queue_wait_ms
    return max(int((started_at - run.submitted_at).total_seconds() * 1000), 0)


def _set(held: Q, per_run: dict[Any, dict[str, Any]], **same: Any) -> int:
    """One UPDATE of the rows `held` still matches: `same` for every row, and per row the values of
    `per_run[pk]` (the same fields for every row), joined from a VALUES list.

    Plain SQL because the ORM's bulk_update builds a CASE per field and row, whose construction
    cost more than everything else a worker does for a no-op run.
    """
    if not per_run:
        return 0
    quote = connection.ops.quote_name
    table = quote(Run._meta.db_table)
    fields = [Run._meta.get_field(name) for name in next(iter(per_run.values()))]
    pk = Run._meta.pk
    # PostgreSQL types a VALUES column from its first values (a column of NULLs is text): cast each.
    typed = connection.vendor == "postgresql"

    def value_of(field) -> str:
        return f"CAST(v.{quote(field.column)} AS {field.db_type(connection)})" if typed else f"v.{quote(field.column)}"

    assignments = [f"{quote(field.column)} = {value_of(field)}" for field in fields]
    params: list[Any] = []
    for name, value in same.items():
        field = Run._meta.get_field(name)
        assignments.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    row = "(" + ", ".join(["%s"] * (len(fields) + 1)) + ")"
    values: list[Any] = []
    for run_pk, row_values in per_run.items():
        values.append(pk.get_db_prep_save(run_pk, connection))
        values += [field.get_db_prep_save(row_values[field.name], connection) for field in fields]
    query = Run.objects.filter(held).query
    where, where_params = query.get_compiler(connection=connection).compile(query.where)
    columns = ", ".join(quote(column) for column in [pk.column, *(field.column for field in fields)])
    v_pk = f"CAST(v.{quote(pk.column)} AS {pk.db_type(connection)})" if typed else f"v.{quote(pk.column)}"
    sql = (
        f"WITH v ({columns}) AS (VALUES {', '.join([row] * len(per_run))}) "
        f"UPDATE {table} SET {', '.join(assignments)} FROM v WHERE {table}.{quote(pk.column)} = {v_pk} AND {where}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*values, *params, *where_params])
        return cursor.rowcount


def attempts_record(attempts: Sequence[Attempt], *, held: Q, backoff: bool = True) -> list[Run]:
    """Record how attempts ended, for the runs the claim `held` still holds; returns the runs written.

    A success is final; a failure queues the run again (after a backoff, unless `backoff` is off)
    while it has retries left, and is final after that.
    """
    if not attempts:
        return []
    written: list[Run] = []
    succeeded = [attempt for attempt in attempts if attempt.error is None]
    retried = [attempt for attempt in attempts if attempt.error is not None and attempt.retries_left]
    failed = [attempt for attempt in attempts if attempt.error is not None and not attempt.retries_left]
    for group, status in ((succeeded, RunStatus.SUCCEEDED), (failed, RunStatus.FAILED)):
        if not group:
            continue
        values = {attempt.run.pk: _final_values(attempt, succeeded=status == RunStatus.SUCCEEDED) for attempt in group}
        count = _set(held, values, status=status, lease_expires_at=None)
        written += _mark(group, status, values, count)
    if retried:
        values = {
            attempt.run.pk: {
                "error": attempt.error, "run_ms": attempt.run_ms, "started_at": attempt.started_at,
                "queue_wait_ms": _queue_wait_ms(attempt.run, attempt.started_at), "log": _log_of(attempt),
                "attempt_errors": attempt_errors_after(attempt.run, attempt.error, at=attempt.finished_at),
            }
            for attempt in retried
        }  # fmt: skip
        count = _set(held, values, status=RunStatus.QUEUED, lease_expires_at=None, worker="")
        for run in _mark(retried, RunStatus.QUEUED, values, count):
            delay = retry_delay(run.attempts) if backoff else 0.0
            logger.info(
                "run %s attempt %s failed (%s); retrying in %.2fs", run.pk, run.attempts, run.error["type"], delay
            )
            run_dispatch([run], countdown=delay or None)
            written.append(run)
    runs_announce(written)
    return written


def _final_values(attempt: Attempt, *, succeeded: bool) -> dict[str, Any]:
    run = attempt.run
    met, overran = sla_outcome(deadline=run.deadline, started_at=attempt.started_at, finished_at=attempt.finished_at)
    values = {
        "result": attempt.result if succeeded else None,
        "error": None if succeeded else attempt.error,
        "run_ms": attempt.run_ms,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "queue_wait_ms": _queue_wait_ms(run, attempt.started_at),
        "sla_met": met and succeeded,
        "sla_miss": overran,
        "log": _log_of(attempt),
    }
    if not succeeded:
        values["attempt_errors"] = attempt_errors_after(run, attempt.error, at=attempt.finished_at)
    return values


def _log_of(attempt: Attempt) -> str:
    return attempt.run.log if attempt.log is None else attempt.log


def attempt_errors_after(run: Run, error: dict[str, str], *, at: datetime) -> list[dict[str, Any]]:
    """The run's attempt errors with this attempt's added: the last ATTEMPT_ERRORS_KEPT, tracebacks cut to their end."""
    traceback = error.get("traceback") or ""
    if len(traceback) > ATTEMPT_TRACEBACK_MAX_CHARS:
        traceback = "…" + traceback[-ATTEMPT_TRACEBACK_MAX_CHARS:]
    entry = {
        "attempt": run.attempts, "at": at.isoformat(), "type": error.get("type", ""),
        "message": error.get("message", ""), "traceback": traceback,
    }  # fmt: skip
    return [*run.attempt_errors, entry][-ATTEMPT_ERRORS_KEPT:]


def _mark(group: list[Attempt], status: RunStatus, values: dict, count: int) -> list[Run]:
    """Set the written values on the in-memory runs, leaving out any taken from the claim meanwhile."""
    runs = [attempt.run for attempt in group]
    if count < len(runs):
        # Cancelled or reclaimed meanwhile (rare): the rows that now carry this attempt's start were written.
        rows = Run.objects.filter(pk__in=[run.pk for run in runs], status=status).values_list("pk", "started_at")
        landed = {pk for pk, started_at in rows if started_at == values[pk]["started_at"]}
        runs = [run for run in runs if run.pk in landed]
    for run in runs:
        run.status, run.lease_expires_at = status, None
        for name, value in values[run.pk].items():
            setattr(run, name, value)
    return runs


def runs_announce(runs: Sequence[Run]) -> None:
    """After a status change is written: store results, publish events, end leadership and free slots."""
    if not runs:
        return
    ended = [run for run in runs if run.is_terminal]
    pipe = redis_client().pipeline(transaction=False)
    for run in ended:
        if run.status == RunStatus.SUCCEEDED and run.agent.cache_ttl > 0 and not run.cached:
            result_cache_store(pipe, agent=run.agent.name, version=run.agent_version, input=run.input,
                               result=run.result, ttl=run.agent.cache_ttl)  # fmt: skip
    events.publish_run_events((events.event_of_run(run, _event_name(run)) for run in runs), pipe=pipe)
    runs_ended_record(runs)
    leaders = [run for run in ended if run.follows_id is None and run.agent.cache_ttl > 0]
    if leaders:
        leaders_release(leaders)
        leaders_ended(leaders)
    parents_notify(ended)
    for run in runs:
        if run.status != RunStatus.RUNNING:
            slots_free(run)


def parents_notify(ended: Sequence[Run]) -> int:
    """Count the waiting parents of gathered children that ended down; returns how many parents go on."""
    counts = Counter(
        (run.parent_id, run.parent_round) for run in ended if run.parent_id is not None and run.parent_round is not None
    )
    return parents_resume(counts) if counts else 0


def parents_resume(counts: dict[tuple[Any, int], int]) -> int:
    """Count each waiting parent of the round given down by that many children; queue those with none left.

    One statement for every parent of a message's children, whatever their number: no child ever
    looks at its siblings. Returns how many parents were queued to go on.
    """
    quote = connection.ops.quote_name
    table, pk = quote(Run._meta.db_table), Run._meta.pk
    typed = connection.vendor == "postgresql"
    v_id = f"CAST(v.run AS {pk.db_type(connection)})" if typed else "v.run"
    v_round, v_ended = ("CAST(v.round AS integer)", "CAST(v.ended AS integer)") if typed else ("v.round", "v.ended")
    pending, status = quote("pending_children"), quote("status")
    left = f"{pending} - {v_ended}"
    values, params = [], []
    for (parent_id, round_), ended in counts.items():
        values.append("(%s, %s, %s)")
        params += [pk.get_db_prep_value(parent_id, connection), round_, ended]
    sql = (
        f"WITH v (run, round, ended) AS (VALUES {', '.join(values)}) "
        f"UPDATE {table} SET {pending} = CASE WHEN {left} > 0 THEN {left} ELSE 0 END, "
        f"{status} = CASE WHEN {left} > 0 THEN {status} ELSE %s END "
        f"FROM v WHERE {quote(pk.column)} = {v_id} AND {table}.{quote('round')} = {v_round} AND {status} = %s "
        f"RETURNING {quote(pk.column)}, {status}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, RunStatus.QUEUED, RunStatus.WAITING])
        rows = cursor.fetchall()
    woken = [pk.to_python(row[0]) for row in rows if row[1] == RunStatus.QUEUED]
    if not woken:
        return 0
    parents = list(Run.objects.select_related("agent").filter(pk__in=woken, status=RunStatus.QUEUED))
    pipe = redis_client().pipeline(transaction=False)
    queued = Counter(field for run in parents for field in (tier_field(run.tier), agent_field(run.agent.name)))
    backlog_add(pipe, queued)
    events.queue_run_events(pipe, (events.event_of_run(run, "queued") for run in parents))
    run_dispatch(parents, pipe=pipe)
    return len(parents)


def _event_name(run: Run) -> str:
    return "retrying" if run.status == RunStatus.QUEUED else run.status


def slots_free(run: Run) -> None:
    """Give back the run's concurrency slot and dispatch the runs that were waiting for one."""
    limit = run.agent.concurrency_limit
    if not limit:
        return
    woken = slot_release(agent=run.agent.name, run_id=str(run.pk), limit=limit)
    if woken:
        run_dispatch(Run.objects.select_related("agent").filter(pk__in=woken, status=RunStatus.QUEUED))


def runs_expire(runs: Iterable[Run]) -> list[Run]:
    """End queued runs past their expiry as expired, without running them; returns those ended here."""
    runs = list(runs)
    now = timezone.now()
    ended = Run.objects.filter(pk__in=[run.pk for run in runs], status=RunStatus.QUEUED, expires_at__lt=now)
    ended_ids = set(ended.values_list("pk", flat=True))
    if not ended_ids:
        return []
    written = Run.objects.filter(pk__in=ended_ids, status=RunStatus.QUEUED).update(
        status=RunStatus.EXPIRED, finished_at=now, sla_met=False, sla_miss="queue_wait", escalate_at=None
    )
    expired = [run for run in runs if run.pk in ended_ids] if written else []
    for run in expired:
        run.status, run.finished_at, run.sla_met, run.sla_miss = RunStatus.EXPIRED, now, False, "queue_wait"
    runs_announce(expired)
    return expired


CANCELLABLE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING)
# Runs locked and cancelled by one statement, and parents whose children one statement looks for (their ids
# are bound as parameters, of which PostgreSQL takes at most 65,535 a statement).
CANCEL_CHUNK = 5000
# How long a cancel keeps skipping the rows a worker is writing before it waits for each of them in turn.
CANCEL_SKIP_SECONDS = 1.0


def _cancelled_values(now: datetime) -> dict[str, Any]:
    return {"status": RunStatus.CANCELLED, "finished_at": now, "lease_expires_at": None, "escalate_at": None}


def run_cancelled(run: Run, *, announce: bool = True) -> bool:
    """Cancel a queued, running or waiting run; False if it had already ended.

    Without `announce`, the caller announces the run itself (`runs_announce`) once it has done what must
    be heard before the run's end.
    """
    cancelled = Run.objects.filter(pk=run.pk, status__in=CANCELLABLE).update(**_cancelled_values(timezone.now()))
    run.refresh_from_db()
    if not cancelled:
        return False
    events.publish_cancel(run.pk)
    if announce:
        runs_announce([run])
    return True


def children_cancelled(parent_ids: Sequence[Any]) -> int:
    """Cancel the children of (at most CANCEL_CHUNK) `parent_ids` still in flight, CANCEL_CHUNK at a time,
    and announce them; returns how many.

    Rows a worker is writing at that moment (a claim, an outcome) are skipped and taken on a later
    pass. If some are still held after CANCEL_SKIP_SECONDS, each is cancelled on its own, waiting for
    its lock while holding none.
    """
    in_flight = Run.objects.filter(parent_id__in=parent_ids, status__in=CANCELLABLE)
    cancelled, pause = 0, 0.01
    deadline = time.monotonic() + CANCEL_SKIP_SECONDS
    while True:
        found = _cancel_unlocked(in_flight)
        cancelled += found
        if found == CANCEL_CHUNK:
            continue
        if not in_flight.exists():
            return cancelled
        if time.monotonic() > deadline:
            break
        if not found:
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
    for run in in_flight.select_related("agent"):
        cancelled += run_cancelled(run)
    return cancelled


def _cancel_unlocked(runs: QuerySet[Run]) -> int:
    """Cancel up to CANCEL_CHUNK of `runs` that no other transaction holds, and announce them; returns how many.

    Skipping the rows a worker is writing, instead of waiting for them, means this transaction never
    waits while holding locks of its own: it cannot deadlock with a worker's bulk write. The lock is
    the one its UPDATE takes (no key changes), so a run being inserted that refers to one of these
    (a follower, a child) does not hold it up.
    """
    values = _cancelled_values(timezone.now())
    with transaction.atomic():
        locked = runs.select_related("agent").select_for_update(of=("self",), skip_locked=True, no_key=True)
        found = list(locked[:CANCEL_CHUNK])
        if found:
            Run.objects.filter(pk__in=[run.pk for run in found]).update(**values)
    # Only a run that was running is executing somewhere, to be interrupted.
    events.publish_cancels(run.pk for run in found if run.status == RunStatus.RUNNING)
    for run in found:
        for name, value in values.items():
            setattr(run, name, value)
    runs_announce(found)
    return len(found)


def shared_answer(run: Run, *, result: Any, now: datetime) -> dict[str, Any]:
    """The fields of a run answered without executing: from the cache, or by the run it followed."""
    met, overran = sla_outcome(deadline=run.deadline, started_at=None, finished_at=now)
    return {
        "status": RunStatus.SUCCEEDED, "result": result, "error": None, "finished_at": now,
        "sla_met": met, "sla_miss": overran, "escalate_at": None,
    }  # fmt: skip


def runs_answer_from_cache(runs: list[Run], *, charge: RateCharge | None = None) -> list[Run]:
    """Before insert: answer the runs (of cacheable agents) whose result is cached; returns those answered.
    A rate `charge` not yet settled rides on the lookup."""
    hits = result_cache_get_many([(run.agent.name, run.agent_version, run.input) for run in runs], charge=charge)
    now = timezone.now()
    answered = []
    for run, hit in zip(runs, hits, strict=True):
        if hit is not None:
            for name, value in shared_answer(run, result=hit.result, now=now).items():
                setattr(run, name, value)
            run.cached = True
            answered.append(run)
    return answered


def queued_answer_from_cache(runs: list[Run]) -> list[Run]:
    """After commit: finish from the cache the queued runs whose result was stored meanwhile; returns the rest."""
    hits = result_cache_get_many([(run.agent.name, run.agent_version, run.input) for run in runs])
    rest, answered = [], []
    now = timezone.now()
    for run, hit in zip(runs, hits, strict=True):
        if hit is None:
            rest.append(run)
            continue
        values = {**shared_answer(run, result=hit.result, now=now), "cached": True}
        if Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(**values):
            for name, value in values.items():
                setattr(run, name, value)
            answered.append(run)
    runs_announce(answered)
    return rest


def leaders_ended(leaders: Sequence[Run]) -> int:
    """Settle the queued followers of leaders that reached a final status; returns how many were settled.

    Followers of a leader that succeeded or failed end the same way; those of a leader cancelled
    or expired (one caller's fate, not the work's) have the most urgent of them take over the work.
    """
    if not leaders:
        return 0
    waiting = set(
        Run.objects.filter(follows__in=[leader.pk for leader in leaders], status=RunStatus.QUEUED)
        .values_list("follows_id", flat=True)
        .distinct()
    )
    settled = 0
    for leader in leaders:
        if leader.pk not in waiting:
            continue
        if leader.status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
            settled += _followers_finish(leader)
        elif leader.status in TAKEN_OVER_AFTER:
            settled += _followers_take_over(leader)
    return settled


def _followers_finish(leader: Run) -> int:
    now = timezone.now()
    if leader.status == RunStatus.SUCCEEDED:
        outcome = {"status": RunStatus.SUCCEEDED, "result": leader.result, "error": None}
    else:
        cause = leader.error or {}
        message = f"the run it followed ({leader.pk}) failed: {cause.get('message', '')}"
        outcome = {"status": RunStatus.FAILED, "result": None, "error": {**cause, "message": message}}
    with transaction.atomic():
        followers = list(
            Run.objects.select_for_update().select_related("agent").filter(follows=leader, status=RunStatus.QUEUED)
        )
        per_run = {}
        for run in followers:
            met, overran = sla_outcome(deadline=run.deadline, started_at=None, finished_at=now)
            per_run[run.pk] = {"sla_met": met and outcome["status"] == RunStatus.SUCCEEDED, "sla_miss": overran}
        _set(Q(status=RunStatus.QUEUED), per_run, **outcome, finished_at=now, escalate_at=None)
    for run in followers:
        for name, value in {**outcome, **per_run[run.pk], "finished_at": now, "escalate_at": None}.items():
            setattr(run, name, value)
    runs_announce(followers)
    return len(followers)


def _followers_take_over(leader: Run) -> int:
    """The most urgent, then oldest, follower of a cancelled or expired leader takes over the work.

    The others follow it: none is more urgent than the heir, so none waits on less urgent work.
    """
    while True:
        followers = Run.objects.select_related("agent").filter(follows=leader, status=RunStatus.QUEUED)
        heir = followers.order_by(URGENCY, "submitted_at").first()
        if heir is None:
            return 0
        if not Run.objects.filter(pk=heir.pk, follows=leader, status=RunStatus.QUEUED).update(follows=None):
            continue
        heir.follows_id = None
        try:
            holder = leader_take_over(heir, ended=str(leader.pk))
        except redis.RedisError:
            logger.exception("could not hand the in-flight key of %s to %s", leader.pk, heir.pk)
            holder = None
        if holder is not None:
            # Another identical run leads now: everyone follows it.
            moved = Run.objects.filter(pk=heir.pk).update(follows_id=holder)
            moved += Run.objects.filter(follows=leader, status=RunStatus.QUEUED).update(follows_id=holder)
            leaders_ended(list(Run.objects.select_related("agent").filter(pk=holder, status__in=RunStatus.terminal())))
            return moved
        moved = Run.objects.filter(follows=leader, status=RunStatus.QUEUED).update(follows=heir)
        if queued_answer_from_cache([heir]):
            run_dispatch([heir])
        # The heir may have been cancelled before the others moved to it.
        heir.refresh_from_db()
        if heir.is_terminal:
            leaders_ended([heir])
        logger.info("run %s took over from %s run %s for %d followers", heir.pk, leader.status, leader.pk, moved)
        return moved + 1


def followers_orphaned(limit: int) -> int:
    """Followers still queued behind a leader that already ended (a crash between steps): settle them."""
    leader_ids = (
        Run.objects.filter(status=RunStatus.QUEUED, follows__status__in=RunStatus.terminal())
        .values_list("follows_id", flat=True)
        .distinct()[:limit]
    )
    return leaders_ended(list(Run.objects.select_related("agent").filter(pk__in=list(leader_ids))))


def lost_worker_error(run: Run) -> dict[str, str]:
    return {
        "type": "WorkerLost",
        "message": f"the worker running attempt {run.attempts} ({run.worker}) stopped before finishing it",
        "traceback": "",
    }


def attempt_lost(
    run: Run, *, error: dict[str, str], run_ms: int | None = None, backoff: bool = True, retryable: bool = True
) -> bool:
    """Record an attempt that ended outside the agent (killed at the hard limit, or its worker died too often).

    Without `backoff` (the sweeper found the run long after), a run with retries left is queued again at once.
    """
    now = timezone.now()
    attempt = Attempt(
        run=run, started_at=run.started_at or now, finished_at=now, run_ms=run_ms, error=error, retryable=retryable
    )
    return bool(attempts_record([attempt], held=held_by(run), backoff=backoff))


def worker_lost(run: Run, *, dispatch: bool = True) -> bool:
    """The worker holding `run` died: queue the run again without spending one of the agent's retries, or
    fail it once it has lost more than RUN_LOST_ATTEMPTS_MAX workers. Returns whether this call recorded it.

    Without `dispatch`, the run waits for the message Celery delivers again.
    """
    error = lost_worker_error(run)
    if run.lost_attempts >= settings.RUN_LOST_ATTEMPTS_MAX:
        error["message"] += f"; {run.lost_attempts + 1} workers died running it, so it is not tried again"
        return attempt_lost(run, error=error, retryable=False)
    errors = attempt_errors_after(run, error, at=timezone.now())
    requeued = Run.objects.filter(held_by(run)).update(
        status=RunStatus.QUEUED, worker="", lease_expires_at=None, error=error, lost_attempts=F("lost_attempts") + 1,
        attempt_errors=errors,
    )  # fmt: skip
    if not requeued:
        return False
    run.status, run.worker, run.lease_expires_at, run.error = RunStatus.QUEUED, "", None, error
    run.attempt_errors = errors
    run.lost_attempts += 1
    logger.warning("run %s lost its worker (%d so far); queued again", run.pk, run.lost_attempts)
    pipe = redis_client().pipeline(transaction=False)
    backlog_add(pipe, Counter({tier_field(run.tier): 1, agent_field(run.agent.name): 1}))
    events.publish_run_events([events.event_of_run(run, "retrying")], pipe=pipe)
    if dispatch:
        run_dispatch([run])
    return True
