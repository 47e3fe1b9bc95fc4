"""Agents the benchmarks declare (loaded with AGENT_MODULES=bench.agents)."""

import hashlib
import time

from pydantic import BaseModel, Field

from agentplatform.redis_client import redis_client, redis_key
from agents.registry import agent, continuation


def executions_key() -> str:
    """The hash of how many times `bench.costly` ran, per input number."""
    return redis_key("bench", "executions")


class CostlyInput(BaseModel):
    n: int = Field(ge=0, description="Which input of the benchmark's distribution this is.")
    ms: float = Field(default=20, ge=0, le=60_000, description="Milliseconds of CPU time one computation costs.")


# A long SLA: a benchmark backlog of minutes must not be escalated to the critical pool.
@agent(
    name="bench.costly", input=CostlyInput, tier="standard", sla_seconds=3600, cache_ttl=3600,
    soft_time_limit=120, time_limit=150,
)  # fmt: skip
def costly(ctx, input: CostlyInput) -> dict[str, object]:
    """A cacheable computation that costs `ms` of CPU time and depends only on its input."""
    # Counted here, by the agent itself, so that the benchmark measures executions, not infers them.
    redis_client().hincrby(executions_key(), str(input.n), 1)
    digest = hashlib.sha256(str(input.n).encode()).digest()
    deadline = time.process_time() + input.ms / 1000
    while time.process_time() < deadline:
        digest = hashlib.sha256(digest).digest()
    # The result depends on the input alone, not on how much hashing fitted into the time.
    return {"n": input.n, "value": hashlib.sha256(str(input.n).encode()).hexdigest()[:16]}


class NoopInput(BaseModel):
    n: int = Field(default=0, ge=0, description="Any number: distinct numbers are distinct inputs.")


# Critical, so that an uncached execution is served by the one pool bench/overhead.py starts.
@agent(name="bench.noop", input=NoopInput, tier="critical", sla_seconds=3600, cache_ttl=3600, soft_time_limit=10)
def noop(ctx, input: NoopInput) -> dict[str, int]:
    """A cacheable agent that does nothing: what an answer costs, cached or executed, is the platform's."""
    return {"n": input.n}


class NothingInput(BaseModel):
    i: int = Field(default=0, ge=0, description="Which child this is.")


@agent(name="bench.nothing", input=NothingInput, tier="standard", sla_seconds=3600, soft_time_limit=10)
def nothing(ctx, input: NothingInput) -> dict[str, int]:
    """An agent that does no work and caches nothing: every run of it is executed."""
    return {"i": input.i}


class FanInput(BaseModel):
    n: int = Field(ge=1, le=100_000, description="How many children to fan out to.")


@agent(name="bench.fan", input=FanInput, tier="standard", sla_seconds=3600, soft_time_limit=60, time_limit=90)
def fan(ctx, input: FanInput) -> object:
    """Fans out to `n` runs of bench.nothing and gathers them: what coordinating them costs."""
    return ctx.delegate([("bench.nothing", {"i": i}) for i in range(input.n)], then=fan_gathered)


@continuation
def fan_gathered(ctx, input: FanInput, wake) -> dict[str, int]:
    return {"children": len(wake.children), "succeeded": sum(child.succeeded for child in wake.children)}
