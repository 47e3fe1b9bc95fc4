"""Scheduled runs: keep each RunSchedule's beat entry in step with it, and submit a run when it fires.

Beat (django-celery-beat's DatabaseScheduler) reads PeriodicTask rows; a schedule owns exactly one,
which sends FIRE_SCHEDULE_TASK with the schedule's id. Firing only submits a normal run through
run_submit, so a scheduled run is queued, admitted, executed and shown like any other.
"""

import json
import logging
from typing import Any

from celery.schedules import crontab
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django_celery_beat.models import (
    CrontabSchedule,
    IntervalSchedule,
    PeriodicTask,
    crontab_schedule_celery_timezone,
)
from django_celery_beat.validators import crontab_validator
from pydantic import ValidationError

from agentplatform.celery import HOUSEKEEPING_QUEUE
from agents.errors import RunRejected
from agents.models import Agent, Run, RunSchedule
from agents.registry import registry
from agents.runs.submit import RunRequest, input_errors, run_submit
from scheduling.admission import AdmissionRefused
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

FIRE_SCHEDULE_TASK = "agents.fire_schedule"
CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
# A firing still undelivered after this long (no housekeeping worker) is dropped; the next one follows.
MIN_FIRING_EXPIRY_SECONDS = 60


class ScheduleInvalid(Exception):
    """A schedule that cannot be saved; `errors` maps field names to messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


def cron_fields(expression: str) -> dict[str, str]:
    """The five fields of a crontab expression by CrontabSchedule's names; ValueError if it does not parse."""
    parts = expression.split()
    if len(parts) != len(CRON_FIELDS):
        raise ValueError(
            f"Expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}: {expression!r}."
        )
    try:
        crontab_validator(" ".join(parts))
    except DjangoValidationError as exc:
        raise ValueError("; ".join(exc.messages)) from exc
    fields = dict(zip(CRON_FIELDS, parts, strict=True))
    # What beat itself will parse.
    crontab(**fields)
    return fields


def schedule_errors(
    *, agent: Agent | None, input: Any, tier: str | None, cron: str, interval_seconds: int | None, enabled: bool
) -> dict[str, list[str]]:
    """Field-level problems with a schedule's values (empty: it can be saved).

    A disabled schedule may name a disabled or no-longer-declared agent, so that operators can
    switch off the schedules of an agent they switched off; enabling it checks again.
    """
    errors: dict[str, list[str]] = {}
    spec = registry.get(agent.name) if agent is not None else None
    if agent is not None and (spec is None or not agent.registered):
        if enabled:
            errors["agent"] = [f"Unknown agent {agent.name!r}: the code no longer declares it."]
    elif agent is not None and not agent.enabled and enabled:
        errors["agent"] = [f"Agent {agent.name!r} is disabled; enable it or disable this schedule."]
    errors.update(_input_errors(spec, input))
    if tier is not None and tier not in Tier.values:
        errors["tier"] = [f"{tier!r} is not a tier; choose one of {', '.join(Tier.values)}."]
    errors.update(_timing_errors(cron=cron, interval_seconds=interval_seconds))
    return errors


def _input_errors(spec, input: Any) -> dict[str, list[str]]:
    """The input checks run_submit makes: a JSON object within the size limit that the agent's schema accepts."""
    if not isinstance(input, dict):
        return {"input": ["Expected a JSON object."]}
    size = len(json.dumps(input, separators=(",", ":")).encode())
    if size > settings.RUN_MAX_INPUT_BYTES:
        return {"input": [f"Input is {size} bytes; the limit is {settings.RUN_MAX_INPUT_BYTES}."]}
    if spec is None:
        return {}
    try:
        spec.parse_input(input)
    except ValidationError as exc:
        messages = [
            message if path == "non_field_errors" else f"{path}: {message}"
            for path, path_messages in input_errors(exc).items()
            for message in path_messages
        ]
        return {"input": messages}
    return {}


def _timing_errors(*, cron: str, interval_seconds: int | None) -> dict[str, list[str]]:
    if cron and interval_seconds is not None:
        message = "Give either a cron expression or an interval, not both."
        return {"cron": [message], "interval_seconds": [message]}
    if not cron and interval_seconds is None:
        message = "Give a cron expression or an interval in seconds."
        return {"cron": [message], "interval_seconds": [message]}
    if cron:
        try:
            cron_fields(cron)
        except ValueError as exc:
            return {"cron": [f"Not a crontab expression: {exc}"]}
    elif interval_seconds < 1:
        return {"interval_seconds": ["Must be at least 1 second."]}
    return {}


def schedule_validate(*, schedule: RunSchedule) -> None:
    """Raise ScheduleInvalid with field-level messages if the schedule cannot be saved as it stands."""
    # Read afresh: the agent may have been disabled since the schedule was loaded.
    agent = Agent.objects.filter(pk=schedule.agent_id).first() if schedule.agent_id is not None else None
    errors = schedule_errors(
        agent=agent,
        input=schedule.input,
        tier=schedule.tier,
        cron=schedule.cron,
        interval_seconds=schedule.interval_seconds,
        enabled=schedule.enabled,
    )
    if agent is None:
        errors["agent"] = ["Unknown agent."]
    if schedule.owner_id is None:
        errors["owner"] = ["A schedule submits its runs on behalf of an owner."]
    if errors:
        raise ScheduleInvalid(errors)


def schedule_save(*, schedule: RunSchedule) -> RunSchedule:
    """Validate and save the schedule, and create or update the beat entry that fires it."""
    schedule_validate(schedule=schedule)
    with transaction.atomic():
        schedule.cron = " ".join(schedule.cron.split())
        schedule.save()
        task = schedule.periodic_task or PeriodicTask()
        task.name = f"run schedule {schedule.pk}: {schedule.name}"
        task.task = FIRE_SCHEDULE_TASK
        task.kwargs = json.dumps({"schedule_id": schedule.pk})
        # Firing only submits, on the housekeeping worker, so that it never waits behind agent work; the
        # run itself goes to its tier's queue.
        task.queue = HOUSEKEEPING_QUEUE
        task.enabled = schedule.enabled
        task.description = f"Submits a run of {schedule.agent.name!r} for {schedule.owner}."
        if schedule.cron:
            task.crontab = _crontab_schedule(schedule.cron)
            task.interval = None
            task.expire_seconds = None
        else:
            task.interval = _interval_schedule(schedule.interval_seconds)
            task.crontab = None
            task.expire_seconds = max(schedule.interval_seconds, MIN_FIRING_EXPIRY_SECONDS)
        task.save()
        if schedule.periodic_task_id != task.pk:
            schedule.periodic_task = task
            RunSchedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
    return schedule


def _crontab_schedule(expression: str) -> CrontabSchedule:
    spec = {**cron_fields(expression), "timezone": crontab_schedule_celery_timezone()}
    # Not get_or_create: beat's own admin may have stored the same crontab twice.
    return CrontabSchedule.objects.filter(**spec).first() or CrontabSchedule.objects.create(**spec)


def _interval_schedule(seconds: int) -> IntervalSchedule:
    spec = {"every": seconds, "period": IntervalSchedule.SECONDS}
    return IntervalSchedule.objects.filter(**spec).first() or IntervalSchedule.objects.create(**spec)


def schedules_route_firings() -> int:
    """Put the beat entries of schedules saved before firings had a queue of their own on the housekeeping
    queue; returns how many moved."""
    moved = 0
    for task in PeriodicTask.objects.filter(task=FIRE_SCHEDULE_TASK).exclude(queue=HOUSEKEEPING_QUEUE):
        task.queue = HOUSEKEEPING_QUEUE
        # Through the instance, so that beat's change signal tells running schedulers.
        task.save(update_fields=["queue"])
        moved += 1
    return moved


def schedule_delete(*, schedule: RunSchedule) -> None:
    """Delete the schedule and its beat entry, so that it never fires again."""
    with transaction.atomic():
        task_id = schedule.periodic_task_id
        schedule.delete()
        if task_id is not None:
            # Through the instance, so that beat's change signal tells running schedulers.
            for task in PeriodicTask.objects.filter(pk=task_id):
                task.delete()


def schedule_fire(*, schedule_id: int, firing_id: str | None = None) -> Run | None:
    """Submit one run for the schedule on its owner's behalf and record it as the last run.

    Returns the run, or None when nothing was submitted: the schedule is gone or disabled, its owner
    is inactive, or the submission was refused (logged; the next firing tries again). A firing
    delivered twice (same `firing_id`, e.g. the Celery task id) submits one run.
    """
    schedule = RunSchedule.objects.select_related("agent", "owner").filter(pk=schedule_id).first()
    if schedule is None:
        logger.warning("schedule %s no longer exists; nothing submitted", schedule_id)
        return None
    if not schedule.enabled:
        logger.info("schedule %r is disabled; nothing submitted", schedule.name)
        return None
    if not schedule.owner.is_active:
        logger.warning("schedule %r: owner %s is inactive; nothing submitted", schedule.name, schedule.owner)
        return None
    request = RunRequest(
        agent=schedule.agent.name,
        input=schedule.input,
        tier=schedule.tier,
        idempotency_key=f"schedule:{schedule.pk}:{firing_id}" if firing_id else None,
    )
    try:
        run, _ = run_submit(user=schedule.owner, request=request)
    except RunRejected as exc:
        logger.warning("schedule %r: run rejected: %s", schedule.name, exc.errors)
        return None
    except AdmissionRefused as exc:
        logger.warning("schedule %r: run refused, retry after %ss: %s", schedule.name, exc.retry_after, exc)
        return None
    # An update, not save(): an operator editing the schedule meanwhile keeps their change.
    RunSchedule.objects.filter(pk=schedule.pk).update(last_run=run)
    return run
