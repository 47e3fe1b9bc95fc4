"""Executing one run on a worker: claim it, call the agent, record the outcome, publish it."""

import json
import logging
import time
import traceback
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Q
from django.utils import timezone
from pydantic import BaseModel

from agentplatform import events
from agents.cancellation import cancel_watch
from agents.context import RunContext
from agents.dispatch import run_dispatch
from agents.errors import AgentNotRegistered, RunCancelled
from agents.models import Run, RunStatus
from agents.registry import registry
from scheduling.retries import retry_delay

logger = logging.getLogger(__name__)


def run_claim(*, run_id: str, worker: str, lease_seconds: float) -> Run | None:
    """Take a queued run (or a running one whose lease expired) with one conditional UPDATE.

    None means someone else holds it or it is no longer runnable: a duplicate delivery,
    a cancelled run, a finished one. The caller then does nothing.
    """
    now = timezone.now()
    claimed = (
        Run.objects.filter(pk=run_id)
        .filter(Q(status=RunStatus.QUEUED) | Q(status=RunStatus.RUNNING, lease_expires_at__lt=now))
        .update(
            status=RunStatus.RUNNING,
            worker=worker,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds + settings.RUN_LEASE_GRACE_SECONDS),
            attempts=F("attempts") + 1,
        )
    )
    if not claimed:
        return None
    return Run.objects.select_related("agent", "submitted_by").get(pk=run_id)


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
        return
    except Exception as exc:
        retryable = not isinstance(exc, AgentNotRegistered)
        run_attempt_failed(run=run, error=error_record(exc), run_ms=_ms_since(started), retryable=retryable)
        return
    run_succeeded(run=run, result=result, run_ms=_ms_since(started))


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _claim_held(run: Run) -> Q:
    """The rows still held by this attempt: not cancelled, not reclaimed by another worker."""
    return Q(pk=run.pk, status=RunStatus.RUNNING, worker=run.worker, attempts=run.attempts)


def _timing(run: Run, finished_at) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if run.queue_wait_ms is None and run.started_at is not None:
        fields["queue_wait_ms"] = int((run.started_at - run.submitted_at).total_seconds() * 1000)
    return fields


def run_succeeded(*, run: Run, result: Any, run_ms: int) -> bool:
    now = timezone.now()
    written = Run.objects.filter(_claim_held(run)).update(
        status=RunStatus.SUCCEEDED,
        result=result,
        error=None,
        finished_at=now,
        run_ms=run_ms,
        lease_expires_at=None,
        sla_met=now <= run.submitted_at + timedelta(seconds=run.sla_seconds),
        **_timing(run, now),
    )
    if written:
        run.status = RunStatus.SUCCEEDED
        _publish(run, "succeeded")
    return bool(written)


def run_attempt_failed(*, run: Run, error: dict[str, str], run_ms: int | None, retryable: bool = True) -> bool:
    """Record a failed attempt: queue the next one after a backoff, or fail the run when out of attempts."""
    now = timezone.now()
    if retryable and run.attempts <= run.max_retries:
        written = Run.objects.filter(_claim_held(run)).update(
            status=RunStatus.QUEUED,
            error=error,
            run_ms=run_ms,
            lease_expires_at=None,
            worker="",
            **_timing(run, now),
        )
        if written:
            run.status = RunStatus.QUEUED
            delay = retry_delay(run.attempts)
            logger.info("run %s attempt %s failed (%s); retrying in %.2fs", run.pk, run.attempts, error["type"], delay)
            run_dispatch([run], countdown=delay)
            _publish(run, "retrying")
        return bool(written)
    written = Run.objects.filter(_claim_held(run)).update(
        status=RunStatus.FAILED,
        error=error,
        finished_at=now,
        run_ms=run_ms,
        lease_expires_at=None,
        sla_met=False,
        **_timing(run, now),
    )
    if written:
        run.status = RunStatus.FAILED
        _publish(run, "failed")
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
    return run_attempt_failed(run=run, error=error, run_ms=run_ms)


def _publish(run: Run, event: str) -> None:
    try:
        events.publish_run_events(
            [
                events.run_event(
                    event=event,
                    run_id=run.pk,
                    agent=run.agent.name,
                    tier=run.tier,
                    status=run.status,
                    attempt=run.attempts,
                )
            ]
        )
    except Exception:
        # The row is the truth and is already written; a lost event only delays a waiter's recheck.
        logger.exception("could not publish %s event for run %s", event, run.pk)
