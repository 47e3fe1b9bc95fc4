import time

from pydantic import BaseModel, Field

from agents.registry import agent


class SleepInput(BaseModel):
    seconds: float = Field(ge=0, le=3600, description="How long to sleep.")


@agent(name="sleep", input=SleepInput, soft_time_limit=3600, time_limit=3630)
def sleep(ctx, input: SleepInput) -> dict[str, float]:
    """Sleep for `seconds`, holding a worker slot without using the CPU (for tests and load)."""
    started = time.monotonic()
    time.sleep(input.seconds)
    return {"slept": round(time.monotonic() - started, 3)}
