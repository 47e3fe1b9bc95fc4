"""Celery tasks: thin edges that call the run modules."""

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.signals import beat_init
from celery.worker.request import Request
from django.conf import settings

from agentplatform.celery import HOUSEKEEPING_QUEUE, platform_task
from agents import retention, schedules
from agents.runs import execute, recovery
from agents.runs.dispatch import EXECUTE_RUN_TASK
from scheduling.tiers import Tier

SWEEP_TASK = "agents.sweep"


class ExecuteRunRequest(Request):
    """Runs in the worker's main process, which outlives the pool process that executes the message."""

    def on_timeout(self, soft, timeout):
        # The pool kills the process at the message's hard limit: fail the run it was executing.
        if not soft and self.args:
            execute.message_killed(run_ids=self.args, worker=self.hostname, pid=self.worker_pid, limit=timeout)
        return super().on_timeout(soft, timeout)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        # Before the message is requeued: a pool process died mid-message, so hand its runs back
        # and let the redelivered message claim them at once.
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, WorkerLostError) and self.args:
            execute.message_lost(run_ids=self.args, worker=self.hostname, pid=self.worker_pid)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


@platform_task(name=EXECUTE_RUN_TASK, queue=Tier.STANDARD.queue, Request=ExecuteRunRequest)
def execute_run(self, *run_ids: str) -> None:
    execute.runs_execute(run_ids=run_ids, worker=self.request.hostname)


@platform_task(
    name=SWEEP_TASK,
    queue=HOUSEKEEPING_QUEUE,
    soft_time_limit=recovery.SWEEP_TIME_LIMIT_SECONDS / 2,
    time_limit=recovery.SWEEP_TIME_LIMIT_SECONDS,
    expires=30,
)
def sweep(self) -> None:
    recovery.sweep()


@platform_task(
    name=retention.PURGE_TASK,
    queue=HOUSEKEEPING_QUEUE,
    soft_time_limit=retention.PURGE_SOFT_TIME_LIMIT_SECONDS,
    time_limit=retention.PURGE_TIME_LIMIT_SECONDS,
    # A pass that waited longer than the interval is redundant: the next one is due.
    expires=settings.RUN_PURGE_INTERVAL_SECONDS,
)
def purge_runs(self) -> None:
    retention.runs_purge()


@platform_task(name=schedules.FIRE_SCHEDULE_TASK, queue=HOUSEKEEPING_QUEUE, soft_time_limit=10, time_limit=20)
def fire_schedule(self, schedule_id: int) -> None:
    # The task id names the firing: a redelivered message submits no second run.
    schedules.schedule_fire(schedule_id=schedule_id, firing_id=self.request.id)


@beat_init.connect
def _firings_on_housekeeping(sender, **kwargs) -> None:
    # Schedules saved before firings had a queue of their own still name the critical one.
    schedules.schedules_route_firings()
