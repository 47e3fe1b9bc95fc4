"""Publishing run messages: the message carries the run id only, on the queue of the run's tier."""

from collections.abc import Iterable

from agentplatform.celery import app
from scheduling.tiers import Tier

EXECUTE_RUN_TASK = "agents.execute_run"


def run_dispatch(runs: Iterable, *, countdown: float | None = None) -> None:
    """Send one execute message per run, all over one broker connection."""
    with app.producer_or_acquire() as producer:
        for run in runs:
            app.send_task(
                EXECUTE_RUN_TASK,
                args=[str(run.pk)],
                queue=Tier(run.tier).queue,
                soft_time_limit=run.soft_time_limit,
                time_limit=run.time_limit,
                countdown=countdown,
                producer=producer,
            )
