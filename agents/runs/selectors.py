"""Finding, listing and waiting on runs."""

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from django.db import connection
from django.db.models import Count, QuerySet

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus

logger = logging.getLogger(__name__)

WAIT_RECHECK_SECONDS = 5.0
WAIT_POLL_SECONDS = 0.5


def run_visible_to(user) -> QuerySet[Run]:
    """The runs a user may see: their own, or all for staff."""
    runs = Run.objects.select_related("agent")
    return runs if user.is_staff else runs.filter(submitted_by=user)


def run_list(
    *, user, agent: str | None = None, status: str | None = None, tier: str | None = None, parent=None
) -> QuerySet[Run]:
    runs = run_visible_to(user)
    if parent:
        runs = runs.filter(parent_id=parent)
    if agent:
        runs = runs.filter(agent__name=agent)
    if status:
        runs = runs.filter(status=status)
    if tier:
        runs = runs.filter(tier=tier)
    return runs.order_by("-submitted_at")


def run_wait(*, run: Run, timeout: float) -> Run:
    """Return the run (as just read) once it is terminal or `timeout` seconds have passed, woken by its events.

    While it waits it holds no database connection (a pooled one goes back to the pool), so
    waiters never starve submissions of connections. With Redis unreachable, it reads the row
    every WAIT_POLL_SECONDS instead.
    """
    if run.is_terminal or timeout <= 0:
        return run
    deadline = time.monotonic() + timeout
    pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(events.run_channel(run.pk))
    except redis.RedisError as exc:
        logger.warning("waiting on run %s by reading the database: Redis is unreachable (%s)", run.pk, exc)
        pubsub.close()
        return _wait_polling(run, deadline)
    try:
        # The run may have finished between the first read and the subscription.
        run = _read_again(run)
        next_read = time.monotonic() + WAIT_RECHECK_SECONDS
        while not run.is_terminal:
            _connection_released()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = pubsub.get_message(timeout=min(remaining, 1.0))
            except redis.RedisError as exc:
                logger.warning("waiting on run %s by reading the database: Redis went away (%s)", run.pk, exc)
                return _wait_polling(run, deadline)
            woken = message is not None and json.loads(message["data"]).get("status") in RunStatus.terminal()
            # The database is the truth: read it when woken, and now and then in case an event was lost.
            if woken or time.monotonic() >= next_read:
                run = _read_again(run)
                next_read = time.monotonic() + WAIT_RECHECK_SECONDS
    finally:
        pubsub.close()
    return run


def _wait_polling(run: Run, deadline: float) -> Run:
    while not run.is_terminal:
        _connection_released()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(remaining, WAIT_POLL_SECONDS))
        run = _read_again(run)
    return run


def _read_again(run: Run) -> Run:
    """The run's row as it stands now, with its agent in the same query (refresh_from_db would drop the agent)."""
    return Run.objects.select_related("agent").get(pk=run.pk)


def _connection_released() -> None:
    """Hand this thread's database connection back while it waits; the next read takes one again."""
    # Inside a transaction the connection holds the transaction's state: it cannot be given back.
    if not connection.in_atomic_block:
        connection.close()


def run_children_by_status(run: Run) -> dict[str, int]:
    """How many of the run's children stand at each status."""
    rows = Run.objects.filter(parent=run).values_list("status").annotate(count=Count("pk")).order_by()
    return dict(rows)


@dataclass(frozen=True)
class RunTree:
    root: Any
    count: int
    truncated: bool
    runs: list[dict[str, Any]]


TREE_FIELDS = {
    "id": "pk", "parent": "parent_id", "agent": "agent__name", "tier": "tier", "status": "status",
    "submitted_at": "submitted_at", "started_at": "started_at", "finished_at": "finished_at",
    "queue_wait_ms": "queue_wait_ms", "run_ms": "run_ms", "cached": "cached", "follows": "follows_id",
    "round": "parent_round", "index": "sibling_index",
}  # fmt: skip


def run_tree(*, run: Run, limit: int) -> RunTree:
    """The run and every run below it (children, their children, …), at most `limit` of them, top first."""
    if run.root is None and run.parent_id is None:
        # A run at the top of its tree: every run of the tree names it as root (one indexed read).
        below = Run.objects.filter(root=run.pk)
        count = below.count() + 1
        rows = list(below.order_by("submitted_at", "sibling_index").values(*TREE_FIELDS.values())[: limit - 1])
    else:
        rows, count, level = [], 0, [run.pk]
        while level:
            children = list(Run.objects.filter(parent_id__in=level).values(*TREE_FIELDS.values()))
            count += len(children)
            rows += children[: max(limit - 1 - len(rows), 0)]
            level = [child["pk"] for child in children]
        count += 1
    top = Run.objects.filter(pk=run.pk).values(*TREE_FIELDS.values())
    nodes = [{name: row[column] for name, column in TREE_FIELDS.items()} for row in [*top, *rows]]
    return RunTree(root=run.pk, count=count, truncated=count > len(nodes), runs=nodes)
