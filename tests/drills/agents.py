"""Agents of the fault drills, loaded by the drill processes (only) through AGENT_MODULES; each notes
its executions (see executions.py)."""

import contextlib
import os
import time

from pydantic import BaseModel, Field

from agents.registry import agent
from tests.drills.executions import note


class DrillInput(BaseModel):
    tag: str = Field(max_length=100, description="Names the drill and the submission the run belongs to.")
    seconds: float = Field(default=0.0, ge=0, le=5, description="How long the agent works (sleeps).")


def _count(ctx, input: DrillInput) -> dict:
    note("start", ctx)
    time.sleep(input.seconds)
    note("done", ctx)
    return {"pid": os.getpid()}


@agent(name="drill.count", input=DrillInput, soft_time_limit=5, time_limit=10, max_retries=0)
def count(ctx, input: DrillInput) -> dict:
    """Works `seconds`, noting its start and its completion; allows no retry."""
    return _count(ctx, input)


@agent(name="drill.count_retrying", input=DrillInput, soft_time_limit=5, time_limit=10, max_retries=2)
def count_retrying(ctx, input: DrillInput) -> dict:
    """drill.count for an agent that allows two retries."""
    return _count(ctx, input)


class HangInput(BaseModel):
    tag: str = Field(max_length=100, description="Names the drill and the submission the run belongs to.")


@agent(name="drill.hang", input=HangInput, soft_time_limit=0.5, time_limit=1.5, max_retries=0)
def hang(ctx, input: HangInput) -> dict:
    """Notes its start, then never returns: it swallows SoftTimeLimitExceeded, so only the hard limit ends it."""
    note("start", ctx)
    while True:
        # Swallowing the soft limit (and anything else) is the point.
        with contextlib.suppress(Exception):
            time.sleep(0.05)
