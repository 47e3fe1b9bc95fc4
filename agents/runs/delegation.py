"""Multi-agent work: a run hands work to child runs, or waits for a signal or a time, holding no worker.

An agent (or a continuation) returns what `ctx.delegate`, `ctx.wait_for_signal` or `ctx.sleep`
built. The worker then writes, in one transaction, the run as `waiting` (with what it will go on
with: its continuation, its state, what it waits for) and its children, in one INSERT; the
children go to their queues together. Each child that ends counts its parent down in the same
pass that records its end (`parents_notify` in finish); the last one queues the parent again, and
the worker that claims it calls the continuation with the children's outcomes. A signal posted to
the run, or its wake-up time, queues it the same way. A run in a tree is a run like any other:
cache, coalescing, events, cancellation and admission apply to every step.
"""

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from agentplatform import events
from agents.errors import AgentNotRegistered, RunNotWaiting
from agents.models import Run, RunStatus
from agents.registry import continuation_name, registry
from agents.runs.dispatch import run_dispatch
from agents.runs.finish import Attempt, parents_resume, slots_free
from agents.runs.submit import RunRequest, run_submit_many

logger = logging.getLogger(__name__)

# What a run that handed its work to a continuation agent does when that agent's run ends: take its outcome.
ADOPT = "adopt"
FAIL, CONTINUE = "fail", "continue"
SIGNAL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
# A wake-up this close is sent as a countdown message; a later one is left to the sweeper's pass.
COUNTDOWN_MAX_SECONDS = 300


class ChildFailed(Exception):
    """A child the run gathered did not succeed, and the run fails with it (the default)."""


@dataclass(frozen=True)
class Child:
    """One run to delegate: an agent, its input, and optionally a tier or the cache bypassed."""

    agent: str
    input: dict[str, Any]
    tier: str | None = None
    cache: str = "use"


@dataclass(frozen=True)
class ChildOutcome:
    """How a delegated child ended, as its parent's continuation sees it."""

    run: str
    agent: str
    status: str
    result: Any
    error: dict[str, Any] | None
    cached: bool
    # Shared the execution of an identical run in flight instead of running itself.
    followed: bool = False

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.SUCCEEDED


@dataclass(frozen=True)
class Wake:
    """What a continuation is called with besides the run's input: why the run woke, and its state."""

    kind: str
    state: Any = None
    children: list[ChildOutcome] = field(default_factory=list)
    signal: str | None = None
    payload: Any = None
    timed_out: bool = False

    @property
    def results(self) -> list[Any]:
        """The children's results, in the order they were delegated (None for a child that did not succeed)."""
        return [child.result if child.succeeded else None for child in self.children]

    @property
    def failed(self) -> list[ChildOutcome]:
        return [child for child in self.children if not child.succeeded]


@dataclass(frozen=True)
class Delegation:
    """What a run waits for, and what it goes on with: returned by an agent instead of a result."""

    kind: str  # "children", "signal" or "timer"
    then: str
    state: Any = None
    children: tuple[Child, ...] = ()
    on_failure: str = FAIL
    signal: str | None = None
    seconds: float | None = None


def then_of(then: Callable[..., Any] | str) -> str:
    """How a run's row names what it goes on with: a declared continuation, or an agent to hand over to."""
    if isinstance(then, str):
        if registry.get(then) is None:
            raise ValueError(f"then={then!r} is not a declared agent")
        return f"agent:{then}"
    name = continuation_name(then)
    if registry.continuation(name) is not then:
        raise ValueError(f"{name} is not a declared continuation: decorate it with @continuation")
    return f"fn:{name}"


def children_of(children: Sequence[Child | tuple[str, dict[str, Any]]]) -> tuple[Child, ...]:
    return tuple(child if isinstance(child, Child) else Child(*child) for child in children)


def run_delegate(*, attempt: Attempt, held: Q) -> bool:
    """Write the run as waiting, with its children if it delegated; False if the claim was lost meanwhile."""
    run, delegation = attempt.run, attempt.delegation
    now = timezone.now()
    wake_at = now + timedelta(seconds=delegation.seconds) if delegation.seconds is not None else None
    waiting = {
        "status": RunStatus.WAITING,
        "worker": "",
        "lease_expires_at": None,
        "round": run.round + 1,
        "resume": {
            "kind": delegation.kind,
            "then": delegation.then,
            "state": delegation.state,
            "on_failure": delegation.on_failure,
            "signal": delegation.signal,
        },
        "signal": None,
        "wake_at": wake_at,
        "pending_children": len(delegation.children),
        # Each step of the run counts its own attempts: a continuation has its agent's retries afresh.
        "attempts": 0,
        "lost_attempts": 0,
        "started_at": attempt.started_at,
        "run_ms": attempt.run_ms,
        # What the agent logged before it delegated stays with the run (see finish.Attempt.log).
        "log": run.log if attempt.log is None else attempt.log,
        "queue_wait_ms": run.queue_wait_ms
        if run.queue_wait_ms is not None
        else max(int((attempt.started_at - run.submitted_at).total_seconds() * 1000), 0),
    }
    with transaction.atomic():
        if not Run.objects.filter(held, pk=run.pk).update(**waiting):
            return False
        for name, value in waiting.items():
            setattr(run, name, value)
        ended = 0
        if delegation.children:
            requests = [
                RunRequest(agent=child.agent, input=child.input, tier=child.tier, cache=child.cache)
                for child in delegation.children
            ]
            outcome = run_submit_many(user=run.submitted_by, requests=requests, parent=run, parent_round=run.round)
            # Answered from the cache as they were inserted: they never end later, so they count now.
            ended = sum(1 for child, _ in outcome if child.is_terminal)
    events.publish_run_events([events.event_of_run(run, "waiting")])
    slots_free(run)
    if ended:
        parents_resume({(run.pk, run.round): ended})
    elif wake_at is not None and delegation.seconds <= COUNTDOWN_MAX_SECONDS:
        run_dispatch([run], countdown=delegation.seconds)
    return True


def resumed(run: Run, *, call: Callable[[Callable[..., Any], Wake], Any]) -> Any:
    """Go on with a run that woke: the continuation's output, a hand-over to an agent, or ChildFailed."""
    resume = run.resume
    wake = _wake_of(run)
    if wake.kind == "children" and resume.get("on_failure", FAIL) == FAIL and wake.failed:
        child = wake.failed[0]
        message = (child.error or {}).get("message", "")
        raise ChildFailed(f"child run {child.run} ({child.agent}) ended {child.status}: {message}".rstrip(": "))
    then: str = resume["then"]
    if then == ADOPT:
        return wake.children[0].result
    if then.startswith("agent:"):
        children = [asdict(child) for child in wake.children]
        handover = Child(agent=then.removeprefix("agent:"), input={"children": children, "state": wake.state})
        return Delegation(kind="children", then=ADOPT, children=(handover,))
    func = registry.continuation(then.removeprefix("fn:"))
    if func is None:
        raise AgentNotRegistered(f"continuation {then.removeprefix('fn:')!r} is not declared in code")
    return call(func, wake)


def _wake_of(run: Run) -> Wake:
    resume = run.resume
    kind, state = resume["kind"], resume.get("state")
    if kind == "children":
        rows = (
            Run.objects.filter(parent=run, parent_round=run.round)
            .order_by("sibling_index")
            .values_list("pk", "agent__name", "status", "result", "error", "cached", "follows_id")
        )
        children = [
            ChildOutcome(
                run=str(pk), agent=agent, status=status, result=result, error=error, cached=cached,
                followed=follows is not None,
            )
            for pk, agent, status, result, error, cached, follows in rows
        ]  # fmt: skip
        return Wake(kind=kind, state=state, children=children)
    if kind == "signal":
        received = run.signal or {}
        return Wake(
            kind=kind, state=state, signal=resume.get("signal"), payload=received.get("payload"),
            timed_out=run.signal is None,
        )  # fmt: skip
    return Wake(kind=kind, state=state)


def run_signal(*, run: Run, name: str, payload: Any) -> Run:
    """Wake a run waiting for the signal `name`, with its payload; RunNotWaiting if it waits for no such signal."""
    woken = Run.objects.filter(pk=run.pk, status=RunStatus.WAITING, resume__kind="signal", resume__signal=name).update(
        status=RunStatus.QUEUED, signal={"name": name, "payload": payload}, wake_at=None
    )
    run.refresh_from_db()
    if not woken:
        waits_for = (run.resume or {}).get("signal") if run.status == RunStatus.WAITING else None
        raise RunNotWaiting(status=run.status, name=name, waits_for=waits_for)
    events.publish_run_events([events.event_of_run(run, "queued")])
    run_dispatch([run])
    return run


def runs_wake_due(limit: int) -> int:
    """Waiting runs whose wake-up time has passed (a timer, a signal's timeout) go on; returns how many."""
    settled = timezone.now() - timedelta(seconds=settings.SWEEP_QUEUED_AFTER_SECONDS)
    # A wake-up sent as a countdown message has had its chance by then; the claim makes a second one harmless.
    due = list(Run.objects.select_related("agent").filter(status=RunStatus.WAITING, wake_at__lt=settled)[:limit])
    if due:
        run_dispatch(due)
    return len(due)


def parents_stranded(limit: int) -> int:
    """Parents still waiting although every child of their round ended (a worker died between a child's end
    and its count): queue them again; returns how many."""
    settled = timezone.now() - timedelta(seconds=settings.SWEEP_QUEUED_AFTER_SECONDS)
    unfinished = Run.objects.filter(parent=OuterRef("pk"), parent_round=OuterRef("round")).exclude(
        status__in=RunStatus.terminal()
    )
    stranded = (
        Run.objects.filter(status=RunStatus.WAITING, resume__kind="children", started_at__lt=settled)
        .exclude(Exists(unfinished))
        .values_list("pk", "round", "pending_children")[:limit]
    )
    counts = {(pk, round_): max(pending, 1) for pk, round_, pending in stranded}
    return parents_resume(counts) if counts else 0
