"""Executing one run on a worker: claim it, call the agent, record the outcome, publish it."""

import json
import logging
import time
import traceback
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from pydantic import BaseModel

from agentplatform import events
from agents.cancellation import cancel_watch
from agents.coalescing import leader_finished
from agents.context import RunContext
from agents.dispatch import message_parked, message_received, run_dispatch
from agents.errors import AgentNotRegistered, RunCancelled
from agents.models import Run, RunStatus, SlaMiss
from agents.registry import registry
from caching.results import result_cache_put
from scheduling.concurrency import slot_acquire, slot_release, slot_wait
from scheduling.retries import retry_delay
from scheduling.sla import sla_outcome

logger = logging.getLogger(__name__)


def run_claim(*, run_id: str, worker: str, lease_seconds: float) -> Run | None:
    """Take a queued run (or a running one whose lease expired) with one conditional UPDATE.

    None means this delivery does nothing: someone else holds the run, it is cancelled,
    finished or expired, or its agent is at its concurrency limit (the run then waits for a slot).
    """
    run = (
        Run.objects.select_related("agent")
        .defer("result", "error", "agent__input_schema", "agent__description")
        .filter(pk=run_id)
        .first()
    )
    if run is None or run.follows_id is not None:
        return None
    now = timezone.now()
    if run.status == RunStatus.QUEUED and run.expires_at is not None and run.expires_at < now:
        run_expire(run=run)
        return None
    lease_expired = run.status == RunStatus.RUNNING and run.lease_expires_at is not None and run.lease_expires_at < now
    if not (run.status == RunStatus.QUEUED or lease_expired):
        return None
    if lease_expired and run.attempts > run.max_retries:
        run_attempt_failed(run=run, error=lost_worker_error(run), run_ms=None)
        return None
    lease = lease_seconds + settings.RUN_LEASE_GRACE_SECONDS
    limit = run.agent.concurrency_limit
    if limit and not slot_acquire(agent=run.agent.name, run_id=str(run.pk), limit=limit, lease_seconds=lease):
        slot_wait(agent=run.agent.name, run_id=str(run.pk))
        message_parked(str(run.pk))
        logger.info("run %s waits for a slot of %s (limit %s)", run.pk, run.agent.name, limit)
        return None
    claimed = Run.objects.filter(pk=run.pk, status=run.status, attempts=run.attempts).update(
        status=RunStatus.RUNNING,
        worker=worker,
        started_at=now,
        lease_expires_at=now + timedelta(seconds=lease),
        attempts=run.attempts + 1,
    )
    if not claimed:
        if limit:
            _release_slot(run)
        return None
    run.status, run.worker, run.started_at, run.attempts = RunStatus.RUNNING, worker, now, run.attempts + 1
    return run


def run_expire(*, run: Run) -> bool:
    """End a queued run that can no longer start in time."""
    now = timezone.now()
    expired = Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.EXPIRED, finished_at=now, sla_met=False, sla_miss=SlaMiss.QUEUE_WAIT
    )
    if expired:
        run.status = RunStatus.EXPIRED
        _publish(run, "expired")
        leader_finished(run)
    return bool(expired)


def run_lease_release(*, run_id: str, worker: str) -> bool:
    """End the lease of a run whose worker process died, so that its redelivered message can claim it now."""
    return bool(
        Run.objects.filter(pk=run_id, status=RunStatus.RUNNING, worker=worker).update(lease_expires_at=timezone.now())
    )


def lost_worker_error(run: Run) -> dict[str, str]:
    return {
        "type": "WorkerLost",
        "message": f"the worker running attempt {run.attempts} ({run.worker}) stopped before finishing it",
        "traceback": "",
    }


def _release_slot(run: Run) -> None:
    """Give back the run's concurrency slot and dispatch the runs that were waiting for one."""
    limit = run.agent.concurrency_limit
    if not limit:
        return
    woken = slot_release(agent=run.agent.name, run_id=str(run.pk), limit=limit)
    if woken:
        run_dispatch(Run.objects.filter(pk__in=woken, status=RunStatus.QUEUED))


def _jsonable(output: Any) -> Any:
    if isinstance(output, BaseModel):
        return output.model_dump(mode="json")
    # Fails here, as the agent's error, rather than later when the row is written.
    return json.loads(json.dumps(output))


def error_record(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def run_execute(*, run_id: str, worker: str, lease_seconds: float) -> None:
    """Run one attempt of a run if this delivery wins the claim."""
    message_received(run_id)
    run = run_claim(run_id=run_id, worker=worker, lease_seconds=lease_seconds)
    if run is None:
        logger.info("run %s not claimed by %s: already taken, cancelled or finished", run_id, worker)
        return
    _publish(run, "started")
    spec = registry.get(run.agent.name)
    started = time.monotonic()
    try:
        if spec is None:
            raise AgentNotRegistered(f"agent {run.agent.name!r} is not declared in code on {worker}")
        with cancel_watch.watching(str(run.pk)):
            output = spec.func(RunContext(run), spec.parse_input(run.input))
            result = _jsonable(output)
    except RunCancelled:
        # run_cancel already recorded the outcome.
        logger.info("run %s cancelled while running", run.pk)
        _release_slot(run)
        return
    except Exception as exc:
        retryable = not isinstance(exc, AgentNotRegistered)
        run_attempt_failed(run=run, error=error_record(exc), run_ms=_ms_since(started), retryable=retryable)
        _release_slot(run)
        return
    run_succeeded(run=run, result=result, run_ms=_ms_since(started))
    _release_slot(run)


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _claim_held(run: Run) -> Q:
    """The rows still held by this attempt: not cancelled, not reclaimed by another worker."""
    return Q(pk=run.pk, status=RunStatus.RUNNING, worker=run.worker, attempts=run.attempts)


def _finish_fields(run: Run, finished_at, *, succeeded: bool) -> dict[str, Any]:
    """Timings and the SLA outcome written with a final status."""
    met, overran = sla_outcome(deadline=run.deadline, started_at=run.started_at, finished_at=finished_at)
    return {
        **_timing(run),
        "finished_at": finished_at,
        "lease_expires_at": None,
        "sla_met": met and succeeded,
        "sla_miss": overran,
    }


def _timing(run: Run) -> dict[str, Any]:
    if run.queue_wait_ms is None and run.started_at is not None:
        return {"queue_wait_ms": int((run.started_at - run.submitted_at).total_seconds() * 1000)}
    return {}


def run_succeeded(*, run: Run, result: Any, run_ms: int) -> bool:
    now = timezone.now()
    written = Run.objects.filter(_claim_held(run)).update(
        status=RunStatus.SUCCEEDED,
        result=result,
        error=None,
        run_ms=run_ms,
        **_finish_fields(run, now, succeeded=True),
    )
    if written:
        run.status = RunStatus.SUCCEEDED
        if run.agent.cache_ttl > 0:
            result_cache_put(
                agent=run.agent.name, version=run.agent_version, input=run.input, result=result, ttl=run.agent.cache_ttl
            )
        _publish(run, "succeeded")
        leader_finished(run)
    return bool(written)


def run_attempt_failed(
    *, run: Run, error: dict[str, str], run_ms: int | None, retryable: bool = True, backoff: bool = True
) -> bool:
    """Record a failed attempt: queue the next one (after a backoff), or fail the run when out of attempts."""
    now = timezone.now()
    if retryable and run.attempts <= run.max_retries:
        written = Run.objects.filter(_claim_held(run)).update(
            status=RunStatus.QUEUED,
            error=error,
            run_ms=run_ms,
            lease_expires_at=None,
            worker="",
            **_timing(run),
        )
        if written:
            run.status = RunStatus.QUEUED
            delay = retry_delay(run.attempts) if backoff else 0.0
            logger.info("run %s attempt %s failed (%s); retrying in %.2fs", run.pk, run.attempts, error["type"], delay)
            run_dispatch([run], countdown=delay or None)
            _publish(run, "retrying")
        return bool(written)
    written = Run.objects.filter(_claim_held(run)).update(
        status=RunStatus.FAILED,
        error=error,
        run_ms=run_ms,
        **_finish_fields(run, now, succeeded=False),
    )
    if written:
        run.status = RunStatus.FAILED
        _publish(run, "failed")
        leader_finished(run)
    return bool(written)


def run_hard_time_limit_exceeded(*, run_id: str, limit: float) -> bool:
    """Record the attempt whose process the pool killed at the hard time limit."""
    run = Run.objects.select_related("agent").filter(pk=run_id, status=RunStatus.RUNNING).first()
    if run is None:
        return False
    error = {
        "type": "TimeLimitExceeded",
        "message": f"the agent ran past its hard time limit of {limit:g}s and was killed",
        "traceback": "",
    }
    run_ms = int((timezone.now() - run.started_at).total_seconds() * 1000) if run.started_at else None
    recorded = run_attempt_failed(run=run, error=error, run_ms=run_ms)
    _release_slot(run)
    return recorded


def _publish(run: Run, event: str) -> None:
    events.publish_run_events([events.event_of_run(run, event)])
