"""Agents that exist for the test suite (loaded through AGENT_MODULES)."""

import contextlib
import os
import time

import psycopg
from django.db import connection
from pydantic import BaseModel, Field

from agentplatform.redis_client import redis_client, redis_key
from agents.registry import agent
from caching.memoize import memoize


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


@agent(name="test.count", input=CountInput, soft_time_limit=30, time_limit=40, max_retries=2)
def count(ctx, input: CountInput) -> dict:
    """Counts its starts and completions in Redis under `key`, noting its process id; sleeps `seconds` between."""
    client = redis_client()
    executions = client.incr(redis_key("test", "count", input.key))
    client.set(redis_key("test", "pid", input.key), os.getpid())
    time.sleep(input.seconds)
    client.incr(redis_key("test", "done", input.key))
    return {"executions": executions}


@agent(name="test.count_no_retries", input=CountInput, soft_time_limit=30, time_limit=40, max_retries=0)
def count_no_retries(ctx, input: CountInput) -> dict:
    """test.count for an agent that allows no retry."""
    return count(ctx, input)


RAISE_TO = """
local highest = tonumber(redis.call('GET', KEYS[1]) or 0)
if tonumber(ARGV[1]) > highest then redis.call('SET', KEYS[1], ARGV[1]) end
"""


@agent(name="test.concurrent", input=CountInput, soft_time_limit=30, time_limit=40)
def concurrent(ctx, input: CountInput) -> dict:
    """Records in Redis the most runs of itself seen running at once under `key`."""
    client = redis_client()
    active = client.incr(redis_key("test", "active", input.key))
    try:
        client.eval(RAISE_TO, 1, redis_key("test", "max", input.key), active)
        time.sleep(input.seconds)
    finally:
        client.decr(redis_key("test", "active", input.key))
    return {"active": active}


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


class SlowCountInput(BaseModel):
    key: str
    seconds: float = 0.0
    value: int = 0


@agent(name="test.cached_count", input=SlowCountInput, cache_ttl=300, soft_time_limit=30, time_limit=40)
def cached_count(ctx, input: SlowCountInput) -> dict:
    """A cacheable agent that counts its executions in Redis under `key`, then sleeps `seconds`."""
    executions = redis_client().incr(redis_key("test", "count", input.key))
    time.sleep(input.seconds)
    return {"executions": executions, "value": input.value}


@memoize(ttl=300)
def memo_square(key: str, n: int) -> dict:
    """Counts its computations in Redis under `key`, takes a second, and squares `n`."""
    redis_client().incr(redis_key("test", "memo", key))
    time.sleep(1)
    return {"square": n * n}


class MemoInput(BaseModel):
    key: str
    n: int = 3


@agent(name="test.memo", input=MemoInput, soft_time_limit=30, time_limit=40)
def memo(ctx, input: MemoInput) -> dict:
    """Calls a memoized function: simultaneous runs compute it once between them."""
    return memo_square(input.key, input.n)


class OrderInput(BaseModel):
    order_id: int


@agent(name="test.listener", input=OrderInput, topics=["test.orders"], soft_time_limit=10, time_limit=15)
def listener(ctx, input: OrderInput) -> dict:
    """Reacts to each message on the test.orders topic."""
    return {"order": input.order_id}


@agent(name="test.auditor", input=OrderInput, topics=["test.orders"], soft_time_limit=10, time_limit=15)
def auditor(ctx, input: OrderInput) -> dict:
    """Reacts to the test.orders topic too: a message starts one run of each agent."""
    return {"audited": input.order_id}


@agent(name="test.publisher", input=OrderInput, soft_time_limit=10, time_limit=15)
def publisher(ctx, input: OrderInput) -> dict:
    """Publishes an order on the test.orders topic."""
    return {"message": ctx.publish("test.orders", {"order_id": input.order_id})}


def executions(key: str) -> int:
    """How many times test.count or test.cached_count started under `key`."""
    return int(redis_client().get(redis_key("test", "count", key)) or 0)


@agent(name="test.connection_lost", input=CountInput, soft_time_limit=30, time_limit=40)
def connection_lost(ctx, input: CountInput) -> dict:
    """Counts its executions under `key`, then has the database end its worker's connection, as a restart would."""
    executions = redis_client().incr(redis_key("test", "count", input.key))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend,) = cursor.fetchone()
    db = connection.settings_dict
    with psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"], autocommit=True
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [backend])
    return {"executions": executions}
