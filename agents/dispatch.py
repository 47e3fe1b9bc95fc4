"""Publishing run messages: the message carries the run id only, on the queue of the run's tier.

Every dispatched run also gets a marker in one sorted set, scored by when its message is due.
A worker drops the marker when the message arrives, so a queued run without a marker (Redis
was flushed or restarted) or with a long-overdue one has no live message, and the sweeper
dispatches it again. The claim makes an extra message harmless.
"""

import time
from collections.abc import Iterable, Sequence

from agentplatform.celery import app
from agentplatform.redis_client import redis_client, redis_key
from scheduling.tiers import Tier

EXECUTE_RUN_TASK = "agents.execute_run"


def dispatched_key() -> str:
    return redis_key("dispatched")


def run_dispatch(runs: Iterable, *, countdown: float | None = None, tier: Tier | None = None) -> None:
    """Send one execute message per run, all over one broker connection (on `tier`'s queue if given)."""
    runs = list(runs)
    if not runs:
        return
    due = time.time() + (countdown or 0)
    markers = redis_client()
    markers.zadd(dispatched_key(), {str(run.pk): due for run in runs})
    try:
        with app.producer_or_acquire() as producer:
            for run in runs:
                app.send_task(
                    EXECUTE_RUN_TASK,
                    args=[str(run.pk)],
                    queue=(tier or Tier(run.tier)).queue,
                    soft_time_limit=run.soft_time_limit,
                    time_limit=run.time_limit,
                    countdown=countdown,
                    producer=producer,
                )
    except Exception:
        markers.zrem(dispatched_key(), *[str(run.pk) for run in runs])
        raise


def message_received(run_id: str) -> None:
    """A message for the run reached a worker: it no longer needs a marker."""
    redis_client().zrem(dispatched_key(), run_id)


def message_parked(run_id: str) -> None:
    """The run waits without a message (for a concurrency slot); the sweeper re-sends one only once overdue."""
    redis_client().zadd(dispatched_key(), {run_id: time.time()})


def messages_due(run_ids: Sequence[str]) -> list[float | None]:
    """For each run id, when its live message is due (epoch seconds), or None if it has none."""
    if not run_ids:
        return []
    return redis_client().zmscore(dispatched_key(), list(run_ids))
