"""A worker told to stop (SIGTERM: the process manager stopping it, `make up`'s Ctrl-C) hands the runs its
pool holds back at once: queued again, the attempt not spent, no WorkerLost, and the next worker runs them.

Each test runs its own workers on a Redis key prefix of its own, so no other worker of this test run takes
their messages; the runs are recorded with the factories and their messages published as dispatch does.
"""

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from django.conf import settings
from kombu import Queue

from agents.models import Agent, Run, RunStatus
from agents.runs.dispatch import EXECUTE_RUN_TASK
from scheduling.tiers import Tier
from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory
from tests.polling import eventually

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("transactional_db")]

# Generous: the machine may be busy with other test runs' workers.
READY_SECONDS = 90
STOP_SECONDS = 60
# Far longer than any wait of these tests: a worker that waited for its runs to finish would be seen waiting.
LONG_SLEEP_SECONDS = 600
POOL_SIZE = 2
ERROR_MARKS = ("WorkerLostError", "Traceback")


class Workers:
    """Workers of one queue on a key prefix of the test's own, each started and stopped by pid."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.prefix = f"{settings.REDIS_KEY_PREFIX}stop-{uuid.uuid4().hex[:8]}:"
        self.started: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}

    def start(self) -> subprocess.Popen:
        """A standard worker as the Procfile runs it, ready to take messages."""
        log = self.directory / f"worker-{len(self.started) + 1}.log"
        name = f"stop-{len(self.started) + 1}-{os.environ['TEST_RUN_ID']}@%h"
        process = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "agentplatform", "worker", "-Q", Tier.STANDARD.queue,
                "-n", name, "--concurrency", str(POOL_SIZE), "--prefetch-multiplier", "1",
                "--without-gossip", "--without-mingle", "--loglevel", "INFO", "--logfile", str(log),
            ],
            cwd=ROOT, env={**worker_env(), "REDIS_KEY_PREFIX": self.prefix},
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.started.append(process)
        self.logs[process.pid] = log

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the worker exited:\n{self.log(process)[-3000:]}")
            return " ready." in self.log(process)

        eventually(ready, seconds=READY_SECONDS, what="the worker starting", every=0.2)
        return process

    def log(self, process: subprocess.Popen) -> str:
        path = self.logs[process.pid]
        return path.read_text(errors="replace") if path.exists() else ""

    def publish(self, runs: list[Run]) -> None:
        """One message per run on the standard queue of this prefix, as dispatch sends them."""
        publisher = Celery("stop-publisher", broker=settings.CELERY_BROKER_URL, set_as_current=False)
        publisher.conf.update(
            task_queues=[Queue(tier.queue, routing_key=tier.queue) for tier in Tier],
            task_serializer="json",
            broker_transport_options={"global_keyprefix": self.prefix},
        )
        with publisher.producer_or_acquire() as producer:
            for run in runs:
                publisher.send_task(
                    EXECUTE_RUN_TASK, args=[str(run.pk)], queue=Tier.STANDARD.queue, time_limit=run.time_limit,
                    producer=producer,
                )  # fmt: skip
        publisher.close()

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path)
    yield started
    started.stop_all()


def sleeping_runs(count: int, seconds: float) -> list[Run]:
    sleep = Agent.objects.get(name="sleep")
    return [RunFactory(agent=sleep, input={"seconds": seconds}) for _ in range(count)]


def statuses(runs: list[Run]) -> list[str]:
    return sorted(Run.objects.filter(pk__in=[run.pk for run in runs]).values_list("status", flat=True))


def all_in(status: str, runs: list[Run]) -> Callable[[], bool]:
    return lambda: statuses(runs) == [status] * len(runs)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as supervisord stops a program; the worker must have exited well before its runs would end."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker was still running {STOP_SECONDS}s after SIGTERM")


def test_a_stopped_worker_hands_its_running_runs_back_queued_without_spending_an_attempt(workers):
    worker = workers.start()
    runs = sleeping_runs(POOL_SIZE, LONG_SLEEP_SECONDS)
    workers.publish(runs)
    eventually(all_in(RunStatus.RUNNING, runs), seconds=READY_SECONDS, what="the worker running both runs")

    stop(worker)

    log = workers.log(worker)
    for run in Run.objects.filter(pk__in=[run.pk for run in runs]):
        assert (run.status, run.attempts, run.lost_attempts, run.error) == (RunStatus.QUEUED, 0, 0, None), log[-3000:]
        assert (run.worker, run.started_at, run.lease_expires_at) == ("", None, None)
    assert not [mark for mark in ERROR_MARKS if mark in log], log[-3000:]


def test_runs_handed_back_by_a_stopped_worker_are_finished_by_the_next_worker(workers):
    runs = sleeping_runs(POOL_SIZE, 5)
    first = workers.start()
    workers.publish(runs)
    eventually(all_in(RunStatus.RUNNING, runs), seconds=READY_SECONDS, what="the first worker running both runs")
    stop(first)
    assert statuses(runs) == [RunStatus.QUEUED] * POOL_SIZE

    workers.start()

    eventually(all_in(RunStatus.SUCCEEDED, runs), seconds=READY_SECONDS, what="the next worker finishing the runs")
    for run in Run.objects.filter(pk__in=[run.pk for run in runs]):
        assert (run.attempts, run.lost_attempts, run.error) == (1, 0, None)
