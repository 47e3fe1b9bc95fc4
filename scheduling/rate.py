"""Submission rates per user, counted in runs, over a sliding window kept in Redis.

Two counters per user: this window's and the last one's. The rate seen now is this window's count
plus the share of the last window that still lies within one window of now, which smooths the
burst a fixed window allows at its edge. A submission's count rides on the first round trip it makes
to Redis anyway (its result-cache lookup or its backlog reservation), or takes one of its own; one
more gives the runs back when it is refused.
"""

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


class RateCharge:
    """`runs` to count against `who`'s rate: queued on a round trip the caller makes anyway, then settled
    with that round trip's replies (RateExceeded, counting nothing, when they are over the rate)."""

    # What `queue` adds to a pipeline, in front of the caller's own commands.
    COMMANDS = 3

    def __init__(self, *, who: object, runs: int, rate: Rate) -> None:
        self.who, self.runs, self.rate = who, runs, rate
        self.settled = False

    def queue(self, pipe: redis.client.Pipeline) -> None:
        """Queue the count on `pipe`: COMMANDS commands, whose replies go to `settle`."""
        window, self._into = divmod(time.time(), self.rate.seconds)
        self._current = rate_key(self.who, int(window))
        pipe.incrby(self._current, self.runs)
        pipe.expire(self._current, 2 * self.rate.seconds)
        pipe.get(rate_key(self.who, int(window) - 1))

    def settle(self, replies: Sequence[Any] | None) -> None:
        """Judge the count from its replies; None when the round trip failed, which lets the runs in."""
        self.settled = True
        if replies is None:
            logger.warning("could not count a submission against its rate; letting it in")
            return
        counted, _, before = replies
        rate, into = self.rate, self._into
        seen = counted + int(before or 0) * (1 - into / rate.seconds)
        if seen <= rate.runs:
            return
        try:
            redis_client().decrby(self._current, self.runs)
        except redis.RedisError as exc:
            logger.warning("could not give back refused runs to their rate (%s)", exc)
        # The last window's share shrinks as time passes: wait until enough of it has gone.
        excess = seen - rate.runs
        rate_refused_record(self.runs)
        wait = rate.seconds - into if not before else min(rate.seconds - into, excess / int(before) * rate.seconds)
        raise RateExceeded(
            f"{self.runs} more runs would pass your rate of {rate.runs} per {rate.seconds}s.",
            retry_after=max(1, math.ceil(wait)),
        )

    def take(self) -> None:
        """Count the runs in a round trip of their own."""
        pipe = redis_client().pipeline(transaction=False)
        self.queue(pipe)
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("could not count a submission against its rate (%s); letting it in", exc)
            self.settled = True
            return
        self.settle(replies)
