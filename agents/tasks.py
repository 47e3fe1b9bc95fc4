"""Celery tasks: thin edges that call the runtime."""

from celery.exceptions import TimeLimitExceeded

from agentplatform.celery import PlatformTask, platform_task
from agents import runtime
from agents.dispatch import EXECUTE_RUN_TASK
from scheduling.tiers import Tier


class ExecuteRunTask(PlatformTask):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Called in the worker's main process when the pool killed the child at the hard limit.
        if isinstance(exc, TimeLimitExceeded) and args:
            runtime.run_hard_time_limit_exceeded(run_id=args[0], limit=float(exc.args[0]) if exc.args else 0.0)


@platform_task(name=EXECUTE_RUN_TASK, queue=Tier.STANDARD.queue, base=ExecuteRunTask)
def execute_run(self, run_id: str) -> None:
    hard_limit = (self.request.timelimit or (None, None))[0] or 0
    runtime.run_execute(run_id=run_id, worker=self.request.hostname, lease_seconds=float(hard_limit))
