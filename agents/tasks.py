"""Celery tasks: thin edges that call the runtime."""

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded
from celery.worker.request import Request

from agentplatform.celery import PlatformTask, platform_task
from agents import recovery, runtime, schedules
from agents.dispatch import EXECUTE_RUN_TASK
from scheduling.tiers import Tier

SWEEP_TASK = "agents.sweep"


class ExecuteRunRequest(Request):
    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        # In the worker's main process, before the message is requeued: a pool process died
        # mid-run, so end its lease and let the redelivered message claim the run at once.
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and self.args:
            runtime.run_lease_release(run_id=self.args[0], worker=self.hostname)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class ExecuteRunTask(PlatformTask):
    Request = ExecuteRunRequest

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # Called in the worker's main process when the pool killed the child at the hard limit.
        if isinstance(exc, TimeLimitExceeded) and args:
            runtime.run_hard_time_limit_exceeded(run_id=args[0], limit=float(exc.args[0]) if exc.args else 0.0)


@platform_task(name=EXECUTE_RUN_TASK, queue=Tier.STANDARD.queue, base=ExecuteRunTask)
def execute_run(self, run_id: str) -> None:
    hard_limit = (self.request.timelimit or (None, None))[0] or 0
    runtime.run_execute(run_id=run_id, worker=self.request.hostname, lease_seconds=float(hard_limit))


@platform_task(name=SWEEP_TASK, queue=Tier.CRITICAL.queue, soft_time_limit=30, time_limit=60, expires=30)
def sweep(self) -> None:
    recovery.sweep()


@platform_task(name=schedules.FIRE_SCHEDULE_TASK, queue=Tier.CRITICAL.queue, soft_time_limit=10, time_limit=20)
def fire_schedule(self, schedule_id: int) -> None:
    # The task id names the firing: a redelivered message submits no second run.
    schedules.schedule_fire(schedule_id=schedule_id, firing_id=self.request.id)
