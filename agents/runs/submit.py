"""Submitting runs: validation, the result cache, coalescing, admission, one insert and one dispatch."""

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone
from pydantic import ValidationError

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.errors import PayloadTooLarge, RunRejected
from agents.models import Agent, Run, RunStatus
from agents.registry import registry
from agents.runs.coalescing import followed_settle, runs_follow_inflight, runs_lead
from agents.runs.dispatch import run_dispatch
from agents.runs.finish import runs_answer_from_cache
from scheduling.admission import HIGHER_TIERS, AdmissionRefused, Backlog, admission_check
from scheduling.backlog import agent_field, backlog_release, backlog_reserve, tier_field
from scheduling.sla import escalation_due, run_deadline
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """What a caller asks for: one run of an agent on an input."""

    agent: str
    input: Any
    tier: str | None = None
    idempotency_key: str | None = None
    deadline: datetime | None = None
    expires_in: float | None = None
    expires_at: datetime | None = None
    # "use": answer from the result cache when it holds this input; "bypass": always run.
    cache: str = "use"


def input_errors(exc: ValidationError) -> dict[str, list[str]]:
    """Pydantic errors as field paths (`a.b.0`) to messages; `non_field_errors` for the input as a whole."""
    errors: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "non_field_errors"
        errors.setdefault(path, []).append(error["msg"])
    return errors


def _build_run(request: RunRequest, *, user, agents: dict[str, Agent], parent: Run | None) -> Run:
    """An unsaved Run for a request, or RunRejected with field-level messages."""
    agent = agents.get(request.agent)
    spec = registry.get(request.agent)
    if agent is None or spec is None or not agent.registered:
        raise RunRejected({"agent": [f"Unknown agent {request.agent!r}."]})
    if not agent.enabled:
        raise RunRejected({"agent": [f"Agent {request.agent!r} is disabled."]})
    if request.tier is not None and request.tier not in Tier.values:
        raise RunRejected({"tier": [f"{request.tier!r} is not a tier; choose one of {', '.join(Tier.values)}."]})
    if not isinstance(request.input, dict):
        raise RunRejected({"input": ["Expected a JSON object."]})
    size = len(json.dumps(request.input, separators=(",", ":")).encode())
    if size > settings.RUN_MAX_INPUT_BYTES:
        raise PayloadTooLarge({"input": [f"Input is {size} bytes; the limit is {settings.RUN_MAX_INPUT_BYTES}."]})
    try:
        parsed = spec.parse_input(request.input)
    except ValidationError as exc:
        raise RunRejected({"input": input_errors(exc)}) from exc
    now = timezone.now()
    tier = Tier(request.tier or agent.tier)
    if request.deadline is not None and request.deadline <= now:
        raise RunRejected({"deadline": ["The deadline has already passed."]})
    if request.expires_in is not None and request.expires_at is not None:
        raise RunRejected({"expires_at": ["Give expires_in or expires_at, not both."]})
    expires_at = request.expires_at
    if request.expires_in is not None:
        expires_at = now + timedelta(seconds=request.expires_in)
    if expires_at is not None and expires_at <= now:
        raise RunRejected({"expires_at": ["The expiry has already passed."]})
    return Run(
        agent=agent,
        agent_version=spec.version,
        tier=tier,
        input=parsed.model_dump(mode="json"),
        submitted_by=user,
        parent=parent,
        idempotency_key=request.idempotency_key,
        sla_seconds=agent.sla_seconds,
        soft_time_limit=agent.soft_time_limit,
        time_limit=agent.time_limit,
        max_retries=agent.max_retries,
        submitted_at=now,
        deadline=run_deadline(submitted_at=now, sla_seconds=agent.sla_seconds, requested=request.deadline),
        expires_at=expires_at,
        escalate_at=escalation_due(
            submitted_at=now, sla_seconds=agent.sla_seconds, fraction=settings.ESCALATION_SLA_FRACTION
        )
        if tier == Tier.STANDARD
        else None,
    )


def _agents_named(names: set[str]) -> dict[str, Agent]:
    agents = Agent.objects.filter(name__in=names).defer("input_schema", "description")
    return {agent.name: agent for agent in agents}


def run_submit(*, user, request: RunRequest, parent: Run | None = None) -> tuple[Run, bool]:
    """Create and dispatch one run; returns (run, created). A repeated idempotency key returns the first run."""
    ((run, created),) = run_submit_many(user=user, requests=[request], parent=parent)
    return run, created


def run_submit_many(*, user, requests: Sequence[RunRequest], parent: Run | None = None) -> list[tuple[Run, bool]]:
    """Create runs for all requests in one transaction and dispatch them together, or reject them all.

    A RunRejected for a batch names the failing item by its index: {"runs": {"3": {"input": [...]}}}.
    """
    agents = _agents_named({request.agent for request in requests if isinstance(request.agent, str)})
    built: list[Run] = []
    for index, request in enumerate(requests):
        try:
            built.append(_build_run(request, user=user, agents=agents, parent=parent))
        except RunRejected as exc:
            if len(requests) == 1:
                raise
            raise type(exc)({"runs": {str(index): exc.errors}}) from exc
    # Runs that may share work: answered from the result cache, or following an identical run in flight.
    pairs = zip(built, requests, strict=True)
    shareable = [run for run, request in pairs if request.cache != "bypass" and run.agent.cache_ttl > 0]
    runs_answer_from_cache(shareable)
    shareable_ids = {run.pk for run in shareable}
    try:
        return _insert_runs(user=user, runs=built, shareable=shareable_ids)
    except IntegrityError:
        # Another request inserted one of these idempotency keys first; now it is found.
        return _insert_runs(user=user, runs=built, shareable=shareable_ids)


def _insert_runs(*, user, runs: list[Run], shareable: set) -> list[tuple[Run, bool]]:
    keys = {run.idempotency_key for run in runs if run.idempotency_key}
    # Only a lookup of idempotency keys must share a transaction with the insert; a lone INSERT is
    # atomic in itself, and skipping BEGIN and COMMIT saves a lone run two round trips.
    with transaction.atomic() if keys else contextlib.nullcontext():
        existing: dict[str, Run] = {}
        if keys and user is not None:
            existing = {
                run.idempotency_key: run
                for run in Run.objects.select_related("agent").filter(submitted_by=user, idempotency_key__in=keys)
            }
        outcome: list[tuple[Run, bool]] = []
        new_runs: list[Run] = []
        for run in runs:
            key = run.idempotency_key
            if key and key in existing:
                outcome.append((existing[key], False))
                continue
            if key:
                existing[key] = run
            new_runs.append(run)
            outcome.append((run, True))
        queued = [run for run in new_runs if run.status == RunStatus.QUEUED]
        runs_follow_inflight([run for run in queued if run.pk in shareable])
        # A follower takes no worker, so only the runs that will execute count against the backlog.
        executing = [run for run in queued if run.follows_id is None]
        reserved = _admit(executing)
        try:
            if len(new_runs) == 1:
                new_runs[0].save(force_insert=True)
            else:
                Run.objects.bulk_create(new_runs)
        except BaseException:
            backlog_release(reserved)
            raise
        if new_runs:
            transaction.on_commit(lambda: _after_submit(new_runs, executing, shareable=shareable))
    return outcome


def _admit(runs: list[Run]) -> Counter[str]:
    """Reserve the runs' places in their tier's and agent's backlog, or refuse them all (AdmissionRefused).

    Returns the reservation, to be released if the runs are not stored after all.
    """
    reserved: Counter[str] = Counter()
    for run in runs:
        reserved[tier_field(run.tier)] += 1
        reserved[agent_field(run.agent.name)] += 1
    higher = {tier_field(other) for run in runs for other in HIGHER_TIERS[Tier(run.tier)]}
    counts = backlog_reserve(reserved, also=higher) if runs else None
    if counts is None:
        return Counter()
    try:
        _admission_check(runs, counts, drain=lambda queryset: 0.0)
    except AdmissionRefused:
        backlog_release(reserved)
        # Only a refusal needs to know how fast the backlog drains (for Retry-After): count it now.
        _admission_check(runs, counts, drain=_drain_per_second)
        raise
    return reserved


def _admission_check(runs: list[Run], counts: dict[str, int], *, drain: Callable[[QuerySet[Run]], float]) -> None:
    yield_fraction = settings.ADMISSION_BATCH_YIELD_FRACTION
    for tier in {Tier(run.tier) for run in runs}:
        in_tier = [run for run in runs if run.tier == tier]
        backlogs = {
            other: Backlog(
                queued=counts[tier_field(other)],
                limit=settings.TIER_BACKLOG_LIMITS[other.value],
                drain_per_second=drain(Run.objects.filter(tier=other)),
            )
            for other in (tier, *HIGHER_TIERS[tier])
        }
        # An agent with its own backlog limit is held to that limit instead of the tier's.
        by_agent = Counter(run.agent for run in in_tier if run.agent.backlog_limit is not None)
        for agent, incoming in by_agent.items():
            own = Backlog(
                queued=counts[agent_field(agent.name)],
                limit=agent.backlog_limit,
                drain_per_second=drain(Run.objects.filter(agent=agent)),
            )
            admission_check(
                tier=tier, incoming=incoming, backlogs={**backlogs, tier: own},
                yield_fraction=yield_fraction, label=f"agent {agent.name!r}",
            )  # fmt: skip
        if incoming := len(in_tier) - by_agent.total():
            admission_check(tier=tier, incoming=incoming, backlogs=backlogs, yield_fraction=yield_fraction)


def _drain_per_second(runs: QuerySet[Run]) -> float:
    window = settings.ADMISSION_DRAIN_WINDOW_SECONDS
    finished = runs.filter(finished_at__gte=timezone.now() - timedelta(seconds=window)).count()
    return finished / window


def _after_submit(runs: list[Run], executing: list[Run], *, shareable: set) -> None:
    """After commit: the runs' events and message markers in one round trip, then their messages."""
    pipe = redis_client().pipeline(transaction=False)
    events.queue_run_events(
        pipe, (events.event_of_run(run, "queued" if run.status == RunStatus.QUEUED else "succeeded") for run in runs)
    )
    # Followers from before the insert: their leader may have ended before they were committed.
    followers = [run for run in runs if run.follows_id is not None]
    try:
        leading = runs_lead([run for run in executing if run.pk in shareable])
        run_dispatch([run for run in executing if run.pk not in shareable] + leading, pipe=pipe)
        followed_settle(followers)
    except Exception:
        # The runs are stored and stay queued: the caller must not see a failure and submit them again.
        logger.exception("could not dispatch %d queued runs; they stay queued until re-dispatched", len(executing))


def run_rerun(*, run: Run, user) -> Run:
    """Submit a new run of the same agent, input and tier as `run`, on behalf of `user`."""
    new_run, _ = run_submit(user=user, request=RunRequest(agent=run.agent.name, input=run.input, tier=run.tier))
    return new_run
