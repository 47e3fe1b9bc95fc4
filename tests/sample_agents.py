"""Agents that exist for the test suite (loaded through AGENT_MODULES)."""

import contextlib
import time

from pydantic import BaseModel, Field

from agentplatform.redis_client import redis_client, redis_key
from agents.registry import agent


class FlakyInput(BaseModel):
    fail_times: int = Field(ge=0)


@agent(name="test.flaky", input=FlakyInput, max_retries=3, soft_time_limit=10, time_limit=15)
def flaky(ctx, input: FlakyInput) -> dict:
    """Fails its first `fail_times` attempts, then succeeds."""
    if ctx.attempt <= input.fail_times:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return {"attempt": ctx.attempt}


class CountInput(BaseModel):
    key: str
    seconds: float = 0.0


@agent(name="test.count", input=CountInput, soft_time_limit=30, time_limit=40)
def count(ctx, input: CountInput) -> dict:
    """Counts its executions in Redis under `key`, then sleeps `seconds`."""
    executions = redis_client().incr(redis_key("test", "count", input.key))
    time.sleep(input.seconds)
    return {"executions": executions}


class StubbornInput(BaseModel):
    seconds: float


@agent(name="test.stubborn", input=StubbornInput, soft_time_limit=0.5, time_limit=1.5)
def stubborn(ctx, input: StubbornInput) -> dict:
    """Ignores its soft time limit, so only the hard limit stops it."""
    deadline = time.monotonic() + input.seconds
    while time.monotonic() < deadline:
        # Swallowing SoftTimeLimitExceeded is the point.
        with contextlib.suppress(Exception):
            time.sleep(0.05)
    return {}


class ChildInput(BaseModel):
    message: str


@agent(name="test.parent", input=ChildInput, soft_time_limit=10, time_limit=15)
def parent(ctx, input: ChildInput) -> dict:
    """Submits an echo run and publishes on a topic."""
    child = ctx.submit("echo", {"message": input.message})
    ctx.publish("test.parent", {"child": child})
    return {"child": child}
