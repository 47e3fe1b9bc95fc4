"""Waiting on a run until it ends (`?wait=`), woken by its own events, holding no database connection.

A waiter listens on the run's own channel, where its end is announced, and reads the row when woken
(the database is the truth) and now and then in case an event was lost. With Redis unreachable it
reads the row every WAIT_POLL_SECONDS instead.
"""

import dataclasses
import logging
import time
import uuid

import redis
from django.db import connection
from redis.client import PubSub

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus
from agents.runs.selectors import run_visible
from agents.runs.submit import RunRequest, run_submit
from scheduling.rate import RateCharge

logger = logging.getLogger(__name__)

WAIT_RECHECK_SECONDS = 5.0
WAIT_POLL_SECONDS = 0.5


def run_wait(*, run_id, user, timeout: float) -> Run:
    """The run (Run.DoesNotExist if `user` may not see it) once it is terminal or `timeout` seconds have
    passed.

    While it waits it holds no database connection (a pooled one goes back to the pool), so
    waiters never starve submissions of connections.
    """
    if timeout <= 0:
        return run_visible(run_id=run_id, user=user)
    deadline = time.monotonic() + timeout
    pubsub = _listening(run_id)
    if pubsub is None:
        return _wait_polling(run_visible(run_id=run_id, user=user), deadline, user=user)
    try:
        # Subscribed first: a run that ends after this read is heard of.
        return _waited(run_visible(run_id=run_id, user=user), pubsub, deadline, user=user)
    finally:
        pubsub.close()


def run_submit_and_wait(
    *, user, request: RunRequest, timeout: float, charge: RateCharge | None = None
) -> tuple[Run, bool]:
    """Submit a run for its caller (as run_submit with as_caller) and answer once it is terminal or `timeout`
    seconds have passed; returns (run, created).

    The waiter listens on the run's channel before the run exists, so it hears every event the run
    publishes without reading the row first: between the submission and the run's end it makes no
    request of the database, while a worker claims and executes the run.
    """
    if timeout <= 0:
        return run_submit(user=user, request=request, as_caller=True, charge=charge)
    deadline = time.monotonic() + timeout
    run_id = uuid.uuid4()
    pubsub = _listening(run_id)
    try:
        run, created = run_submit(
            user=user, request=dataclasses.replace(request, run_id=run_id), as_caller=True, charge=charge
        )
        if run.pk != run_id:
            # A repeated idempotency key answers with the run first submitted with it: wait on that one.
            if pubsub is not None:
                pubsub.close()
                pubsub = None
            return run_wait(run_id=run.pk, user=user, timeout=deadline - time.monotonic()), created
        if pubsub is None:
            return _wait_polling(run, deadline, user=user), created
        return _waited(run, pubsub, deadline, user=user), created
    finally:
        if pubsub is not None:
            pubsub.close()


def _listening(run_id) -> PubSub | None:
    """A subscription to the run's own channel, or None if Redis cannot be reached (the waiter then polls)."""
    pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(events.run_channel(run_id))
    except redis.RedisError as exc:
        pubsub.close()
        logger.warning("waiting on run %s by reading the database: Redis is unreachable (%s)", run_id, exc)
        return None
    return pubsub


def _waited(run: Run, pubsub: PubSub, deadline: float, *, user) -> Run:
    """`run` as read last, once its end is heard of on `pubsub` (subscribed before it was read) or at `deadline`."""
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
            return _wait_polling(run, deadline, user=user)
        heard = events.events_of_message(message["data"]) if message is not None else ()
        woken = any(event.get("status") in RunStatus.terminal() for event in heard)
        # The database is the truth: read it when woken, and now and then in case an event was lost.
        if woken or time.monotonic() >= next_read:
            run = run_visible(run_id=run.pk, user=user)
            next_read = time.monotonic() + WAIT_RECHECK_SECONDS
    return run


def _wait_polling(run: Run, deadline: float, *, user) -> Run:
    while not run.is_terminal:
        _connection_released()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(remaining, WAIT_POLL_SECONDS))
        run = run_visible(run_id=run.pk, user=user)
    return run


def _connection_released() -> None:
    """Hand this thread's database connection back while it waits; the next read takes one again."""
    # Inside a transaction the connection holds the transaction's state: it cannot be given back.
    if not connection.in_atomic_block:
        connection.close()
