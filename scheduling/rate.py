"""Submission rates per user, counted in runs, over a sliding window kept in Redis.

Two counters per user: this window's and the last one's. The rate seen now is this window's count
plus the share of the last window that still lies within one window of now, which smooths the
burst a fixed window allows at its edge. One round trip per submission; one more to give the
runs back when it is refused.
"""

import logging
import math
import re
import time
from dataclasses import dataclass

import redis

from agentplatform.metrics import rate_refused_record
from agentplatform.redis_client import redis_client, redis_key

logger = logging.getLogger(__name__)

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
RATE_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")


class RateExceeded(Exception):
    """More runs than the rate allows; come back after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Rate:
    runs: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """`N/second`, `N/minute`, `N/hour` or `N/day`; ValueError otherwise."""
        match = RATE_PATTERN.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a rate such as '6000/minute'")
        return cls(runs=int(match[1]), seconds=PERIODS[match[2]])


def rate_key(who: object, window: int) -> str:
    return redis_key("rate", who, window)


def rate_take(*, who: object, runs: int, rate: Rate) -> None:
    """Count `runs` against `who`'s rate, or raise RateExceeded and count nothing. Without Redis, lets them in."""
    now = time.time()
    window, into = divmod(now, rate.seconds)
    current, previous = rate_key(who, int(window)), rate_key(who, int(window) - 1)
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    pipe.incrby(current, runs)
    pipe.expire(current, 2 * rate.seconds)
    pipe.get(previous)
    try:
        counted, _, before = pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not count a submission against its rate (%s); letting it in", exc)
        return
    overlap = 1 - into / rate.seconds
    seen = counted + int(before or 0) * overlap
    if seen <= rate.runs:
        return
    try:
        client.decrby(current, runs)
    except redis.RedisError as exc:
        logger.warning("could not give back refused runs to their rate (%s)", exc)
    # The last window's share shrinks as time passes: wait until enough of it has gone.
    excess = seen - rate.runs
    rate_refused_record(runs)
    wait = rate.seconds - into if not before else min(rate.seconds - into, excess / int(before) * rate.seconds)
    raise RateExceeded(
        f"{runs} more runs would pass your rate of {rate.runs} per {rate.seconds}s.",
        retry_after=max(1, math.ceil(wait)),
    )
