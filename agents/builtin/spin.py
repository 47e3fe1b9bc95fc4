import time

from pydantic import BaseModel, Field

from agents.registry import agent


class SpinInput(BaseModel):
    ms: float = Field(ge=0, le=60_000, description="Milliseconds of CPU time to burn.")


@agent(name="spin", input=SpinInput, soft_time_limit=120, time_limit=150)
def spin(ctx, input: SpinInput) -> dict[str, float]:
    """Burn `ms` of CPU time in this process (CPU-bound load for benchmarks and capacity tests)."""
    # Counted in CPU time, not wall time: a process that is preempted still does the full work.
    started = time.process_time()
    deadline = started + input.ms / 1000
    spins = 0
    while time.process_time() < deadline:
        spins += 1
    return {"cpu_ms": round((time.process_time() - started) * 1000, 3), "spins": spins}
