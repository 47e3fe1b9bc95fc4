"""Nothing is lost: killed worker processes, a flushed Redis, expired leases (real workers)."""

import os
import signal
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Run, RunStatus
from agents.runs.dispatch import messages_due, run_dispatch
from agents.runs.recovery import sweep
from tests.agents.test_execution import submit, wait, wait_for_status
from tests.polling import eventually

pytestmark = pytest.mark.usefixtures("transactional_db", "workers")


def counter(kind: str, key: str) -> int:
    return int(redis_client().get(redis_key("test", kind, key)) or 0)


def messages_in_queue(queue: str) -> int:
    """Messages waiting in a queue's Redis list (not those a worker holds)."""
    return redis_client().llen(f"{settings.REDIS_KEY_PREFIX}{queue}")


@pytest.fixture
def sweeps_look_at_once(settings):
    """The sweeper looks at every queued run at once and finds every message's marker overdue."""
    settings.SWEEP_QUEUED_AFTER_SECONDS = 0
    settings.SWEEP_MESSAGE_OVERDUE_SECONDS = 0


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


@pytest.mark.usefixtures("sweeps_look_at_once")
def test_a_backlog_older_than_the_overdue_time_gets_no_second_message(api):
    blocker = submit(api, "sleep", {"seconds": 2}, tier="batch")
    wait_for_status(blocker["id"], RunStatus.RUNNING)
    lone = [submit(api, "echo", {"n": n}, tier="batch")["id"] for n in range(5)]
    body = {"runs": [{"agent": "echo", "input": {"n": n}, "tier": "batch"} for n in range(5, 8)]}
    together = [run["id"] for run in api.post("/api/v1/runs/batch/", body, format="json").json()]
    waiting = messages_in_queue("batch")

    reports = [sweep() for _ in range(3)]

    assert waiting == 6
    assert [report.redispatched for report in reports] == [0, 0, 0]
    assert messages_in_queue("batch") == waiting
    assert {wait(api, run_id)["status"] for run_id in lone + together} == {"succeeded"}


@pytest.mark.usefixtures("sweeps_look_at_once")
def test_a_run_whose_message_was_deleted_is_sent_again_exactly_once(api):
    blocker = submit(api, "sleep", {"seconds": 2}, tier="batch")
    wait_for_status(blocker["id"], RunStatus.RUNNING)
    key = uuid.uuid4().hex
    run = submit(api, "test.count", {"key": key}, tier="batch")
    redis_client().delete(f"{settings.REDIS_KEY_PREFIX}batch")  # the message is gone, its marker is not

    reports = [sweep() for _ in range(3)]

    assert [report.redispatched for report in reports] == [1, 0, 0]
    assert messages_in_queue("batch") == 1
    assert wait(api, run["id"])["status"] == "succeeded"
    assert counter("count", key) == 1


@pytest.mark.usefixtures("sweeps_look_at_once")
def test_a_run_whose_message_a_worker_holds_for_its_countdown_is_not_sent_again(api):
    key = uuid.uuid4().hex
    run = Run.objects.get(pk=submit(api, "test.count", {"key": key}, tier="batch", expires_in=600)["id"])
    wait(api, str(run.pk))
    Run.objects.filter(pk=run.pk).update(status=RunStatus.QUEUED, attempts=0)
    redis_client().delete(redis_key("test", "count", key))
    run_dispatch([run], countdown=1)  # the idle worker takes it at once and holds it until it is due
    eventually(lambda: messages_in_queue("batch") == 0, what="the worker taking the message")
    blocker = submit(api, "sleep", {"seconds": 3}, tier="batch")
    wait_for_status(blocker["id"], RunStatus.RUNNING)
    eventually(lambda: messages_due([str(run.pk)])[0] < time.time(), what="the countdown's end")
    assert Run.objects.get(pk=run.pk).status == RunStatus.QUEUED  # due, still held behind the blocker

    report = sweep()

    assert report.redispatched == 0
    assert messages_in_queue("batch") == 0
    assert wait(api, str(run.pk))["status"] == "succeeded"
    assert counter("count", key) == 1


def test_runs_whose_worker_process_died_are_not_sent_again_while_celery_delivers_their_message(api, settings):
    settings.SWEEP_QUEUED_AFTER_SECONDS = 0
    key = uuid.uuid4().hex
    run = submit(api, "test.count", {"key": key, "seconds": 2}, tier="batch")
    pid = wait_for_pid(key)
    ahead = submit(api, "sleep", {"seconds": 2}, tier="batch")  # the message comes back behind this one

    os.kill(pid, signal.SIGKILL)
    wait_for_status(run["id"], RunStatus.QUEUED)
    report = sweep()

    assert report.redispatched == 0
    assert wait(api, ahead["id"])["status"] == "succeeded"
    assert wait(api, run["id"], seconds=30)["status"] == "succeeded"
    assert counter("count", key) == 2  # the attempt killed, and the one its message delivered again
    assert counter("done", key) == 1
