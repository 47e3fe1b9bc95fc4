"""Nothing is lost: killed worker processes, a flushed Redis, expired leases (real workers)."""

import os
import signal
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Run, RunStatus
from agents.runs.recovery import sweep
from tests.agents.test_execution import submit, wait, wait_for_status
from tests.polling import eventually

pytestmark = pytest.mark.usefixtures("transactional_db", "workers")


def counter(kind: str, key: str) -> int:
    return int(redis_client().get(redis_key("test", kind, key)) or 0)


def wait_for_pid(key: str, seconds: float = 10) -> int:
    pid = eventually(
        lambda: redis_client().get(redis_key("test", "pid", key)), seconds=seconds, what="the agent's start"
    )
    return int(pid)


def test_a_run_whose_worker_process_is_killed_still_finishes_exactly_once(api):
    key = uuid.uuid4().hex
    run = submit(api, "test.count", {"key": key, "seconds": 1})

    os.kill(wait_for_pid(key), signal.SIGKILL)
    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded"
    assert finished["attempts"] == 2
    assert counter("count", key) == 2  # started twice
    assert counter("done", key) == 1  # finished once


def test_the_sweeper_requeues_a_run_whose_lease_expired(api):
    key = uuid.uuid4().hex
    run = submit(api, "test.count", {"key": key}, tier="batch")
    wait(api, run["id"])
    # As if a worker claimed it and vanished along with its message.
    Run.objects.filter(pk=run["id"]).update(
        status=RunStatus.RUNNING, attempts=1, worker="gone@host", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    report = sweep()
    finished = wait(api, run["id"])

    assert report.requeued == 1
    assert finished["status"] == "succeeded"
    assert finished["attempts"] == 2
    assert finished["error"] is None


def test_a_run_whose_worker_process_is_killed_does_not_spend_the_agents_retries(api):
    key = uuid.uuid4().hex
    run = submit(api, "test.count_no_retries", {"key": key, "seconds": 1})

    os.kill(wait_for_pid(key), signal.SIGKILL)
    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded"
    assert Run.objects.get(pk=run["id"]).lost_attempts == 1
    assert counter("done", key) == 1


def test_the_sweeper_queues_a_lost_run_again_without_spending_a_retry(api):
    run = submit(api, "echo", {}, tier="batch")  # echo allows no retry
    wait(api, run["id"])
    Run.objects.filter(pk=run["id"]).update(
        status=RunStatus.RUNNING, attempts=1, worker="gone@host", lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    report = sweep()
    finished = wait(api, run["id"])

    assert report.requeued == 1
    assert finished["status"] == "succeeded"
    assert Run.objects.get(pk=run["id"]).lost_attempts == 1


def test_the_sweeper_fails_a_run_that_lost_too_many_workers(api):
    run = submit(api, "echo", {}, tier="batch")
    wait(api, run["id"])
    Run.objects.filter(pk=run["id"]).update(
        status=RunStatus.RUNNING, attempts=settings.RUN_LOST_ATTEMPTS_MAX + 1, worker="gone@host",
        lost_attempts=settings.RUN_LOST_ATTEMPTS_MAX, lease_expires_at=timezone.now() - timedelta(seconds=1),
    )  # fmt: skip

    report = sweep()

    failed = Run.objects.get(pk=run["id"])
    assert report.failed == 1
    assert failed.status == RunStatus.FAILED
    assert failed.error["type"] == "WorkerLost"
    assert failed.lost_attempts == settings.RUN_LOST_ATTEMPTS_MAX


def test_runs_queued_when_redis_is_flushed_all_finish_once(api, monkeypatch):
    blocker = submit(api, "sleep", {"seconds": 2}, tier="batch")
    wait_for_status(blocker["id"], RunStatus.RUNNING)
    keys = [f"{uuid.uuid4().hex}-{n}" for n in range(100)]
    body = {"runs": [{"agent": "test.count", "input": {"key": key}, "tier": "batch"} for key in keys]}
    ids = [run["id"] for run in api.post("/api/v1/runs/batch/", body, format="json").json()]

    # Everything this deployment had in Redis is gone: queues, bindings, markers (FLUSHALL, for our prefix).
    client = redis_client()
    for redis_name in client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}*", count=1000):
        client.delete(redis_name)
    monkeypatch.setattr(settings, "SWEEP_QUEUED_AFTER_SECONDS", 0)
    wait(api, blocker["id"])
    report = sweep()
    finished = [wait(api, run_id, seconds=30) for run_id in ids]

    assert report.redispatched == 100
    assert {run["status"] for run in finished} == {"succeeded"}
    assert [counter("count", key) for key in keys] == [1] * 100


def test_the_sweeper_leaves_runs_with_a_live_message_alone(api, monkeypatch):
    blocker = submit(api, "sleep", {"seconds": 1}, tier="batch")
    wait_for_status(blocker["id"], RunStatus.RUNNING)
    queued = submit(api, "echo", {}, tier="batch")
    monkeypatch.setattr(settings, "SWEEP_QUEUED_AFTER_SECONDS", 0)

    report = sweep()

    assert report.redispatched == 0
    assert wait(api, queued["id"])["status"] == "succeeded"
