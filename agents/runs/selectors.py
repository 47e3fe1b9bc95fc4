"""Finding, listing and waiting on runs."""

import json
import time

from django.db.models import QuerySet

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus

WAIT_RECHECK_SECONDS = 5.0


def run_visible_to(user) -> QuerySet[Run]:
    """The runs a user may see: their own, or all for staff."""
    runs = Run.objects.select_related("agent")
    return runs if user.is_staff else runs.filter(submitted_by=user)


def run_list(*, user, agent: str | None = None, status: str | None = None, tier: str | None = None) -> QuerySet[Run]:
    runs = run_visible_to(user)
    if agent:
        runs = runs.filter(agent__name=agent)
    if status:
        runs = runs.filter(status=status)
    if tier:
        runs = runs.filter(tier=tier)
    return runs.order_by("-submitted_at")


def run_wait(*, run: Run, timeout: float) -> Run:
    """Return the run once it is terminal or `timeout` seconds have passed, woken by its events."""
    run.refresh_from_db()
    if run.is_terminal or timeout <= 0:
        return run
    deadline = time.monotonic() + timeout
    next_read = time.monotonic() + WAIT_RECHECK_SECONDS
    pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(events.run_channel(run.pk))
        # The run may have finished between the first read and the subscription.
        run.refresh_from_db()
        while not run.is_terminal:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            message = pubsub.get_message(timeout=min(remaining, 1.0))
            woken = message is not None and json.loads(message["data"]).get("status") in RunStatus.terminal()
            # The database is the truth: read it when woken, and now and then in case an event was lost.
            if woken or time.monotonic() >= next_read:
                run.refresh_from_db()
                next_read = time.monotonic() + WAIT_RECHECK_SECONDS
    finally:
        pubsub.close()
    return run
