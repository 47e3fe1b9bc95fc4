"""Run messages: each carries run ids only, on the queue of the runs' tier.

Runs dispatched together travel together: one message carries up to RUN_MESSAGE_MAX_RUNS ids of
one tier, so a batch of a thousand runs costs ten publishes, ten claims and ten bulk finishes,
while a lone run still goes alone, at once. A batch is cut into messages of even size, so that
every process of a pool gets its share.

Every dispatched run also gets a marker in one sorted set, scored by when its message is due,
written before the message is published. A worker drops the markers of a message's runs in the
round trip that follows its claim, so a marker means that a message for the run is on its way:
waiting in a queue however long, held by a worker for its countdown, or being delivered again by
Celery. A message Celery puts back in its queue (its worker process died) gets its markers back.
The sweeper re-sends a queued run only when neither a marker nor the broker shows a message for it.
"""

import contextlib
import json
import logging
import math
import time
import uuid
from base64 import b64decode, b64encode
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from functools import lru_cache, partial
from typing import Any

import redis
from celery import signals
from celery.utils.nodenames import anon_nodename
from django.conf import settings
from kombu.transport.redis import Channel
from kombu.utils import json as kombu_json

from agentplatform.celery import app
from agentplatform.redis_client import redis_client, redis_key
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

EXECUTE_RUN_TASK = "agents.execute_run"
# Messages read from the broker per command while looking for the runs it carries.
BROKER_READ_CHUNK = 1000
# Run ids a message's description shows (Flower's task list), of however many it carries.
ARGS_REPR_RUNS = 3


def dispatched_key() -> str:
    return redis_key("dispatched")


def message_time_limit(runs: Sequence) -> float:
    """Celery's hard limit of a message: a backstop only. Each run's own limit is enforced by its worker's
    watchdog while the agent runs (agents/runs/lease.py); this one also leaves room for recording the
    outcomes through a database outage of up to RUN_WRITE_ALLOWANCE_SECONDS."""
    longest = max(run.time_limit for run in runs)
    return longest + settings.RUN_MESSAGE_SLICE_SECONDS + settings.RUN_WRITE_ALLOWANCE_SECONDS


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
    on `tier`'s queue if given. The markers go with the commands already queued on `pipe`, if given, and,
    when the broker is the platform's Redis, so do the messages: one round trip in all."""
    runs = list(runs)
    pipe = pipe if pipe is not None else redis_client().pipeline(transaction=False)
    if not runs:
        pipe.execute()
        return
    due = time.time() + (countdown or 0)
    pipe.zadd(dispatched_key(), {str(run.pk): due for run in runs})
    by_queue: dict[str, list] = defaultdict(list)
    for run in runs:
        by_queue[(tier or Tier(run.tier)).queue].append(run)
    size = per_message or settings.RUN_MESSAGE_MAX_RUNS
    messages = [
        (queue, [str(run.pk) for run in message], message_time_limit(message))
        for queue, queued in by_queue.items()
        for message in messages_of(queued, size)
    ]
    try:
        if broker_is_platform_redis():
            published = [
                message_publish(pipe, queue=queue, run_ids=run_ids, time_limit=time_limit, countdown=countdown)
                for queue, run_ids, time_limit in messages
            ]
            pipe.execute()
            for announce in published:
                announce()
            return
        pipe.execute()
        with app.producer_or_acquire() as producer, producer.batch():
            for queue, run_ids, time_limit in messages:
                app.send_task(
                    EXECUTE_RUN_TASK, args=run_ids, queue=queue, time_limit=time_limit, countdown=countdown,
                    producer=producer,
                )  # fmt: skip
    except Exception:
        redis_client().zrem(dispatched_key(), *[str(run.pk) for run in runs])
        raise


def broker_is_platform_redis() -> bool:
    return app.conf.broker_url == settings.REDIS_URL


def message_publish(
    pipe: redis.client.Pipeline, *, queue: str, run_ids: list[str], time_limit: float, countdown: float | None
) -> Callable[[], None]:
    """Queue on `pipe` the message of `run_ids`, exactly as Celery's producer would put it on the Redis broker;
    returns what to call once `pipe` has been sent.

    Celery builds the message (headers, body); it is enveloped as kombu's Redis transport envelopes it and
    pushed with the commands already on `pipe`, instead of through a producer of its own, which cost a
    lone submission a round trip and more Python than the rest of its dispatch. Celery's publish signals
    are sent as Celery sends them, for whatever instruments them: `before_task_publish` now, and
    `after_task_publish` by the returned call.
    """
    payload, announce = _message(queue=queue, run_ids=run_ids, time_limit=time_limit, countdown=countdown)
    # Runs are published without a priority: each tier's queue is one list, named as kombu names it.
    pipe.lpush(settings.REDIS_KEY_PREFIX + queue, payload)
    return announce


def _message(
    *, queue: str, run_ids: list[str], time_limit: float, countdown: float | None
) -> tuple[str, Callable[[], None]]:
    """The message of `run_ids` as kombu's Redis transport stores it, and what to call once it is sent."""
    task_id = str(uuid.uuid4())
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id, EXECUTE_RUN_TASK, args=run_ids, countdown=countdown, time_limit=time_limit,
        argsrepr=_args_repr(run_ids), kwargsrepr="{}", origin=_origin(), reply_to=app.thread_oid,
    )  # fmt: skip
    signals.before_task_publish.send(
        sender=EXECUTE_RUN_TASK, body=body, exchange="", routing_key=queue, declare=[], headers=headers,
        properties=properties, retry_policy=None,
    )  # fmt: skip
    envelope = {
        "body": b64encode(kombu_json.dumps(body).encode()).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    announce = partial(
        signals.after_task_publish.send,
        sender=EXECUTE_RUN_TASK, body=body, headers=headers, exchange="", routing_key=queue,
    )  # fmt: skip
    return kombu_json.dumps(envelope), announce


class MessageAhead:
    """The message of a lone run, sent while the run's row is being inserted.

    Celery's hand-over (the broker, the worker's main process, a pool process) takes about as long as
    the insert, so the two overlap instead of following each other. Nothing else changes: the claim,
    which finds the row only once it is committed, still decides who runs, and a worker that finds no
    row yet waits for it (agents.runs.execute). The marker and the message are written to a connection
    taken for them, and their replies read once the insert is done (`confirm`): neither waits for the
    other. If the insert fails, `withdraw` takes the message back from its queue; a worker that took it
    already finds no row and drops it.
    """

    def __init__(self, run: Any) -> None:
        self.run_id, queue = str(run.pk), Tier(run.tier).queue
        self.queue_key = settings.REDIS_KEY_PREFIX + queue
        self.payload, self._announce = _message(
            queue=queue, run_ids=[self.run_id], time_limit=message_time_limit([run]), countdown=None
        )
        self._commands = [
            ("ZADD", dispatched_key(), time.time(), self.run_id),
            ("LPUSH", self.queue_key, self.payload),
        ]
        self._pool = redis_client().connection_pool
        self._connection: redis.connection.AbstractConnection | None = None

    @classmethod
    def send(cls, run: Any) -> "MessageAhead | None":
        """Send the run's marker and message without waiting for Redis; None if Redis cannot take them
        (the run is then dispatched after its insert, as any other)."""
        ahead = cls(run)
        try:
            ahead._connection = ahead._pool.get_connection()
            ahead._connection.send_packed_command(ahead._connection.pack_commands(ahead._commands))
        except redis.RedisError as exc:
            ahead._give_back(broken=True)
            logger.warning("could not send run %s ahead of its insert (%s); it goes after", ahead.run_id, exc)
            return None
        return ahead

    def confirm(self) -> bool:
        """Whether the message is queued (its replies read); False if not: dispatch the run as any other."""
        if not self._replies():
            logger.warning("run %s was not sent ahead of its insert; it goes after", self.run_id)
            return False
        self._announce()
        return True

    def withdraw(self) -> None:
        """The insert failed: the message leaves its queue (unless a worker took it already), the marker goes."""
        if not self._replies():
            return
        pipe = redis_client().pipeline(transaction=False)
        pipe.lrem(self.queue_key, 1, self.payload)
        pipe.zrem(dispatched_key(), self.run_id)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("could not withdraw the message of run %s, which was not stored (%s)", self.run_id, exc)

    def _replies(self) -> bool:
        try:
            for _command in self._commands:
                self._connection.read_response()
        except redis.RedisError:
            self._give_back(broken=True)
            return False
        self._give_back(broken=False)
        return True

    def _give_back(self, *, broken: bool) -> None:
        if self._connection is None:
            return
        if broken:
            # Replies may be left unread on it: the next command must not read them as its own.
            self._connection.disconnect()
        self._pool.release(self._connection)
        self._connection = None


def _args_repr(run_ids: list[str]) -> str:
    shown = ", ".join(repr(run_id) for run_id in run_ids[:ARGS_REPR_RUNS])
    return f"[{shown}]" if len(run_ids) <= ARGS_REPR_RUNS else f"[{shown}, … {len(run_ids)} runs]"


@lru_cache(maxsize=1)
def _origin() -> str:
    return anon_nodename()


def messages_received(pipe, run_ids: Sequence[str]) -> None:
    """Queue on `pipe` the removal of the runs' markers: a message for them reached a worker, which claimed
    them first (so a run without a marker that is still queued has no message on its way)."""
    pipe.zrem(dispatched_key(), *run_ids)


def messages_restored(run_ids: Sequence[str]) -> None:
    """Celery puts a message back in its queue (the process that took it died): its runs' markers come back
    with it. Written before the runs are queued again, so that the sweeper never finds them without one."""
    if run_ids:
        redis_client().zadd(dispatched_key(), {str(run_id): time.time() for run_id in run_ids})


def messages_due(run_ids: Sequence[str]) -> list[float | None]:
    """For each run id, when its message is due (epoch seconds), or None if it has no marker."""
    if not run_ids:
        return []
    return redis_client().zmscore(dispatched_key(), list(run_ids))


def messages_confirmed(run_ids: Iterable[str], *, marked: Iterable[str] = ()) -> None:
    """The broker was seen holding messages for `run_ids`: their markers count from now, so that the
    broker is read again only once they are overdue again; the runs of `marked` get one if they have none."""
    now = time.time()
    pipe = redis_client().pipeline(transaction=False)
    run_ids = list(run_ids)
    for start in range(0, len(run_ids), BROKER_READ_CHUNK):
        chunk = {run_id: now for run_id in run_ids[start : start + BROKER_READ_CHUNK]}
        # Only markers that still exist (a worker may have claimed the run since), and never earlier than
        # a countdown's due time.
        pipe.zadd(dispatched_key(), chunk, xx=True, gt=True)
    marked = list(marked)
    if marked:
        pipe.zadd(dispatched_key(), {run_id: now for run_id in marked}, nx=True)
    pipe.execute()


def messages_found() -> set[str]:
    """The run ids carried by the messages the broker holds: waiting in a tier's queue, or delivered to a
    worker and not acknowledged yet (held for a countdown, prefetched, or taken by a worker that died,
    which Celery delivers again once `visibility_timeout` has passed).

    Reads every message, a chunk at a time, so the sweeper calls it only when a marker is overdue or
    missing. A queue is read from its newest end: messages are pushed there and taken from the other,
    so a chunk boundary moving under the read repeats messages but never skips one; the unacknowledged
    ones are read last, since a message taken meanwhile moves there.
    """
    client = _broker_client()
    prefix = settings.REDIS_KEY_PREFIX
    found: set[str] = set()
    # Runs are published without a priority, so each tier's queue is one list.
    for tier in Tier:
        start = 0
        while chunk := client.lrange(prefix + tier.queue, start, start + BROKER_READ_CHUNK - 1):
            found.update(run_id for raw in chunk for run_id in _run_ids(json.loads(raw)))
            start += len(chunk)
    delivered = dict(client.zrange(prefix + Channel.unacked_index_key, 0, -1, withscores=True))
    # A live worker claims a message it took within moments, or as soon as its countdown ends and a
    # process is free: a lease's length is ample for either.
    settled = time.time() - max(settings.SWEEP_QUEUED_AFTER_SECONDS, settings.RUN_LEASE_SECONDS)
    for tag, raw in client.hscan_iter(prefix + Channel.unacked_key, count=BROKER_READ_CHUNK):
        payload, _exchange, _routing_key = json.loads(raw)
        if _held_by_a_live_worker(payload, delivered=delivered.get(tag), settled=settled):
            found.update(_run_ids(payload))
    return found


def _held_by_a_live_worker(payload: dict, *, delivered: float | None, settled: float) -> bool:
    """Whether an unacknowledged message is with a worker that will run it.

    A worker reserves no more messages than it has processes (prefetch 1, late acknowledgement), and
    claims a message's runs the moment a process takes it: a message delivered a while ago whose runs
    are still queued was taken by a worker that died. Celery would deliver it again only after
    `visibility_timeout`; the sweeper sends its runs sooner (the claim makes the late copy harmless).
    A message held for its countdown (a retry's back-off, a timer) is alive until a while after it.
    """
    eta = payload.get("headers", {}).get("eta")
    if eta:
        with contextlib.suppress(ValueError):
            if datetime.fromisoformat(eta).timestamp() > settled:
                return True
    return delivered is None or delivered >= settled


@lru_cache(maxsize=1)
def _broker_client() -> redis.Redis:
    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


def _run_ids(payload: dict) -> Iterator[str]:
    """The run ids a broker message carries, if it is a run message (kombu's JSON envelope, base64 body)."""
    if payload.get("headers", {}).get("task") != EXECUTE_RUN_TASK:
        return
    body = payload["body"]
    if payload.get("properties", {}).get("body_encoding") == "base64":
        body = b64decode(body)
    args = json.loads(body)[0]
    yield from (str(run_id) for run_id in args)
