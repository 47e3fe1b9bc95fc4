"""Agents that exist for the test suite (loaded through AGENT_MODULES)."""

import contextlib
import os
import time

import psycopg
from django.db import connection
from pydantic import BaseModel, Field

from agentplatform.redis_client import redis_client, redis_key
from agents.registry import agent, continuation
from agents.runs.delegation import Child
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


# Multi-agent work


class SquareInput(BaseModel):
    n: int
    fail: bool = False
    seconds: float = 0.0


@agent(name="test.square", input=SquareInput, soft_time_limit=30, time_limit=40)
def square(ctx, input: SquareInput) -> dict:
    """Squares `n` after `seconds`; fails when asked to."""
    time.sleep(input.seconds)
    if input.fail:
        raise ValueError(f"asked to fail on {input.n}")
    return {"square": input.n * input.n}


class FanInput(BaseModel):
    numbers: list[int]
    fail_on: list[int] = []
    on_failure: str = "fail"
    seconds: float = 0.0
    then_agent: bool = False


@agent(name="test.fan", input=FanInput, soft_time_limit=30, time_limit=40)
def fan(ctx, input: FanInput) -> object:
    """Squares every number in a child run of its own, then adds the squares up."""
    children = [("test.square", {"n": n, "fail": n in input.fail_on, "seconds": input.seconds}) for n in input.numbers]
    then = "test.add_children" if input.then_agent else fan_total
    return ctx.delegate(children, then=then, on_failure=input.on_failure, state={"asked": len(input.numbers)})


@continuation
def fan_total(ctx, input: FanInput, wake) -> dict:
    return {
        "total": sum(result["square"] for result in wake.results if result is not None),
        "failed": [child.run for child in wake.failed],
        "asked": wake.state["asked"],
    }


class ChildrenInput(BaseModel):
    children: list[dict]
    state: dict | None = None


@agent(name="test.add_children", input=ChildrenInput, soft_time_limit=30, time_limit=40)
def add_children(ctx, input: ChildrenInput) -> dict:
    """A continuation agent: adds up the squares its parent's children found."""
    return {"total": sum(child["result"]["square"] for child in input.children if child["status"] == "succeeded")}


class TreeInput(BaseModel):
    fanouts: list[int]


@agent(name="test.tree", input=TreeInput, soft_time_limit=30, time_limit=40)
def tree(ctx, input: TreeInput) -> object:
    """Counts the leaves of a tree of runs: each level delegates to `fanouts[0]` runs of the level below."""
    if not input.fanouts:
        return {"leaves": 1}
    width, below = input.fanouts[0], input.fanouts[1:]
    return ctx.delegate([("test.tree", {"fanouts": below})] * width, then=tree_leaves)


@continuation
def tree_leaves(ctx, input: TreeInput, wake) -> dict:
    return {"leaves": sum(result["leaves"] for result in wake.results)}


class ApprovalInput(BaseModel):
    timeout: float = 30.0


@agent(name="test.approval", input=ApprovalInput, soft_time_limit=30, time_limit=40)
def approval(ctx, input: ApprovalInput) -> object:
    """Waits for a person's approval (the signal `approve`)."""
    return ctx.wait_for_signal("approve", timeout=input.timeout, then=approval_given, state={"asked": True})


@continuation
def approval_given(ctx, input: ApprovalInput, wake) -> dict:
    return {"approved": None if wake.timed_out else wake.payload, "timed_out": wake.timed_out}


class NapInput(BaseModel):
    seconds: float


@agent(name="test.nap", input=NapInput, soft_time_limit=30, time_limit=40)
def nap(ctx, input: NapInput) -> object:
    """Sleeps without holding a worker, then says so."""
    return ctx.sleep(input.seconds, then=nap_over, state={"slept": input.seconds})


@continuation
def nap_over(ctx, input: NapInput, wake) -> dict:
    return {"slept": wake.state["slept"]}


class CachedFanInput(BaseModel):
    keys: list[str]


@agent(name="test.cached_fan", input=CachedFanInput, soft_time_limit=30, time_limit=40)
def cached_fan(ctx, input: CachedFanInput) -> object:
    """Fans out over keys, repeated ones included, to a cacheable agent."""
    return ctx.delegate([("test.cached_count", {"key": key, "seconds": 0.2}) for key in input.keys], then=fan_done)


@continuation
def fan_done(ctx, input: CachedFanInput, wake) -> dict:
    return {"children": len(wake.children)}


class ChattyInput(BaseModel):
    lines: int = Field(default=1, ge=0, le=100_000)
    fail_times: int = Field(default=0, ge=0)


@agent(name="test.chatty", input=ChattyInput, max_retries=3, soft_time_limit=10, time_limit=15)
def chatty(ctx, input: ChattyInput) -> dict:
    """Logs `lines` numbered lines through ctx.logger, then fails its first `fail_times` attempts."""
    for number in range(input.lines):
        ctx.logger.info("line %d of attempt %d", number, ctx.attempt)
    if ctx.attempt <= input.fail_times:
        raise RuntimeError(f"attempt {ctx.attempt} fails on purpose")
    return {"lines": input.lines}


@agent(name="test.supervisor", input=SquareInput, soft_time_limit=30, time_limit=40)
def supervisor(ctx, input: SquareInput) -> object:
    """Delegates a square that fails, and on failure hands it to another tier without the fault."""
    return ctx.delegate([("test.square", {"n": input.n, "fail": True})], then=supervise, on_failure="continue")


@continuation
def supervise(ctx, input: SquareInput, wake) -> object:
    if wake.failed and wake.state is None:
        retry = Child("test.square", {"n": input.n}, tier="batch")
        return ctx.delegate([retry], then=supervise, state={"redelegated": wake.failed[0].run})
    return {"square": wake.results[0]["square"], "redelegated": (wake.state or {}).get("redelegated")}


@agent(name="test.chatty_delegate", input=ChattyInput, soft_time_limit=10, time_limit=15)
def chatty_delegate(ctx, input: ChattyInput) -> object:
    """Logs, hands an echo child its work, and logs again in its continuation once the child has ended."""
    ctx.logger.info("handing over to a child")
    return ctx.delegate([("echo", {"n": 1})], then=chatty_delegate_done)


@continuation
def chatty_delegate_done(ctx, input: ChattyInput, wake) -> dict:
    ctx.logger.info("the child ended")
    return {"children": len(wake.children)}
