"""Queued runs per tier, per agent and per user, counted in Redis so that admission never counts rows.

One hash, `<prefix>backlog`, holds a counter per tier (`tier:<name>`), per agent (`agent:<name>`)
and per user and tier (`user:<id>:<tier>`, for each user's share of the tier). A submission
reserves its runs' places as it is admitted (and gives them back if its runs are not stored); a
claim takes away the runs it starts, in a pipeline it sends anyway.
The rarer ways out of the queue (cancellation, expiry, a run turning follower) are not counted as
they happen: the sweeper sets every counter to the database's count on each pass, so the
counters drift for seconds at most.
"""

import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import redis

from agentplatform.redis_client import redis_client, redis_key

if TYPE_CHECKING:
    from scheduling.rate import RateCharge

logger = logging.getLogger(__name__)


def backlog_key() -> str:
    return redis_key("backlog")


def tier_field(tier: str) -> str:
    return f"tier:{tier}"


def agent_field(agent: str) -> str:
    return f"agent:{agent}"


def user_field(user: object, tier: str) -> str:
    return f"user:{user}:{tier}"


def backlog_fields(*, tier: str, agent: str, user: object | None) -> tuple[str, ...]:
    """The counters one queued run counts in: its tier's, its agent's and (if it has one) its submitter's."""
    if user is None:
        return tier_field(tier), agent_field(agent)
    return tier_field(tier), agent_field(agent), user_field(user, tier)


def backlog_reserve(
    deltas: Counter[str], *, also: Iterable[str] = (), charge: "RateCharge | None" = None
) -> dict[str, int] | None:
    """Add `deltas` and read the counters, in one round trip: each counter as it stood before the
    addition, for the fields of `deltas` and of `also`. None when Redis cannot say (nothing added).

    A rate `charge` not yet settled rides on the round trip; over the rate, the reservation is taken
    back and RateExceeded raised."""
    fields = [field for field in deltas if field] + [field for field in also if field not in deltas]
    riding = charge is not None and not charge.settled
    pipe = redis_client().pipeline(transaction=True)
    if riding:
        charge.queue(pipe)
    for field in fields:
        if field in deltas:
            pipe.hincrby(backlog_key(), field, deltas[field])
        else:
            pipe.hget(backlog_key(), field)
    try:
        replies = pipe.execute()
    except redis.RedisError as exc:
        # Admission fails open: a submission is stored without Redis, and the sweeper recounts.
        logger.warning("could not reserve places in the backlog (%s); admitting without counting them", exc)
        if riding:
            charge.settle(None)
        return None
    values = replies[charge.COMMANDS :] if riding else replies
    if riding:
        try:
            charge.settle(replies[: charge.COMMANDS])
        except BaseException:
            backlog_release(deltas)
            raise
    return {field: max(int(value or 0) - deltas.get(field, 0), 0) for field, value in zip(fields, values, strict=True)}


def backlog_release(deltas: Counter[str]) -> None:
    """Take back a reservation whose runs were not stored (best effort: the sweeper recounts)."""
    pipe = redis_client().pipeline(transaction=False)
    backlog_add(pipe, Counter({field: -delta for field, delta in deltas.items()}))
    try:
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not release a backlog reservation (%s); the sweeper recounts it", exc)


def backlog_add(pipe: redis.client.Pipeline, deltas: Counter[str]) -> None:
    """Queue on `pipe` the commands that add `deltas` (negative to take away) to the counters."""
    for field, delta in deltas.items():
        if delta:
            pipe.hincrby(backlog_key(), field, delta)


def backlog_reset(counts: dict[str, int]) -> None:
    """Replace every counter with `counts` (the database's truth), atomically."""
    pipe = redis_client().pipeline(transaction=True)
    pipe.delete(backlog_key())
    if counts:
        pipe.hset(backlog_key(), mapping=counts)
    pipe.execute()
