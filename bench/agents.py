"""Agents the benchmarks declare (loaded with AGENT_MODULES=bench.agents)."""

import hashlib
import time

from pydantic import BaseModel, Field

from agentplatform.redis_client import redis_client, redis_key
from agents.registry import agent


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
