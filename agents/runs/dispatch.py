"""Run messages: each carries run ids only, on the queue of the runs' tier.

Runs dispatched together travel together: one message carries up to RUN_MESSAGE_MAX_RUNS ids of
one tier, so a batch of a thousand runs costs ten publishes, ten claims and ten bulk finishes,
while a lone run still goes alone, at once. A batch is cut into messages of even size, so that
every process of a pool gets its share.

Every dispatched run also gets a marker in one sorted set, scored by when its message is due.
A worker drops the marker when the message arrives, so a queued run without a marker (Redis
was flushed or restarted) or with a long-overdue one has no live message, and the sweeper
dispatches it again. The claim makes an extra message harmless.
"""

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import redis
from django.conf import settings

from agentplatform.celery import app
from agentplatform.redis_client import redis_client, redis_key
from scheduling.tiers import Tier

EXECUTE_RUN_TASK = "agents.execute_run"


def dispatched_key() -> str:
    return redis_key("dispatched")


def message_time_limit(runs: Sequence) -> float:
    """The hard limit of a message: its longest run's, plus the slice its earlier runs may use."""
    longest = max(run.time_limit for run in runs)
    return longest + settings.RUN_MESSAGE_SLICE_SECONDS if len(runs) > 1 else longest


def messages_of(runs: Sequence, size: int) -> list[Sequence]:
    """`runs` cut into the fewest messages of at most `size` runs, of even sizes."""
    count = math.ceil(len(runs) / size)
    base, larger = divmod(len(runs), count)
    messages, start = [], 0
    for index in range(count):
        end = start + base + (index < larger)
        messages.append(runs[start:end])
        start = end
    return messages


def run_dispatch(
    runs: Iterable,
    *,
    countdown: float | None = None,
    tier: Tier | None = None,
    per_message: int | None = None,
    pipe: redis.client.Pipeline | None = None,
) -> None:
    """Send the runs' ids in as few messages per tier as `per_message` (default RUN_MESSAGE_MAX_RUNS) allows,
    on `tier`'s queue if given. The markers go with the commands already queued on `pipe`, if given."""
    runs = list(runs)
    pipe = pipe if pipe is not None else redis_client().pipeline(transaction=False)
    if runs:
        due = time.time() + (countdown or 0)
        pipe.zadd(dispatched_key(), {str(run.pk): due for run in runs})
    pipe.execute()
    if not runs:
        return
    by_queue: dict[str, list] = defaultdict(list)
    for run in runs:
        by_queue[(tier or Tier(run.tier)).queue].append(run)
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for queue, queued in by_queue.items():
                for message in messages_of(queued, per_message or settings.RUN_MESSAGE_MAX_RUNS):
                    app.send_task(
                        EXECUTE_RUN_TASK,
                        args=[str(run.pk) for run in message],
                        queue=queue,
                        time_limit=message_time_limit(message),
                        countdown=countdown,
                        producer=producer,
                    )
    except Exception:
        redis_client().zrem(dispatched_key(), *[str(run.pk) for run in runs])
        raise


def messages_received(pipe, run_ids: Sequence[str]) -> None:
    """Queue on `pipe` the removal of the runs' markers: a message for them reached a worker."""
    pipe.zrem(dispatched_key(), *run_ids)


def message_parked(run_id: str) -> None:
    """The run waits without a message (for a concurrency slot); the sweeper re-sends one only once overdue."""
    redis_client().zadd(dispatched_key(), {run_id: time.time()})


def messages_due(run_ids: Sequence[str]) -> list[float | None]:
    """For each run id, when its live message is due (epoch seconds), or None if it has none."""
    if not run_ids:
        return []
    return redis_client().zmscore(dispatched_key(), list(run_ids))
