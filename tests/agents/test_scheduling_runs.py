"""Deadlines, expiry, escalation, concurrency limits and cancellation on real workers."""

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Agent, Run, RunStatus
from agents.runs.cancellation import run_cancel
from agents.runs.dispatch import run_dispatch
from agents.runs.recovery import sweep
from agents.tasks import sweep as sweep_task
from scheduling.tiers import Tier
from tests.agents.test_execution import submit, wait, wait_for_status
from tests.agents.test_recovery import counter
from tests.factories import RunFactory
from tests.polling import eventually

pytestmark = pytest.mark.usefixtures("transactional_db", "workers")


def occupy(api, tier: str, processes: int, seconds: float) -> list[str]:
    """Keep every process of a tier's worker busy for `seconds`."""
    ids = [submit(api, "sleep", {"seconds": seconds}, tier=tier)["id"] for _ in range(processes)]
    for run_id in ids:
        wait_for_status(run_id, RunStatus.RUNNING)
    return ids


def test_a_run_records_its_deadline_from_the_sla(api):
    Agent.objects.filter(name="echo").update(sla_seconds=30)

    run = Run.objects.get(pk=submit(api, "echo", {})["id"])

    assert run.deadline == run.submitted_at + timedelta(seconds=30)


def test_an_earlier_client_deadline_replaces_the_sla(api):
    deadline = timezone.now() + timedelta(seconds=5)

    run = Run.objects.get(pk=submit(api, "echo", {}, deadline=deadline.isoformat())["id"])

    assert run.deadline == deadline


def test_a_deadline_in_the_past_answers_400(api):
    response = api.post(
        "/api/v1/runs/",
        {"agent": "echo", "input": {}, "deadline": (timezone.now() - timedelta(seconds=1)).isoformat()},
        format="json",
    )

    assert response.status_code == 400
    assert "deadline" in response.json()


def test_a_run_that_overran_while_running_blames_the_run_time(api):
    deadline = (timezone.now() + timedelta(seconds=1)).isoformat()

    run = wait(api, submit(api, "sleep", {"seconds": 1.5}, deadline=deadline)["id"])

    assert run["status"] == "succeeded"
    assert run["sla_met"] is False
    assert run["sla_miss"] == "run_time"


def test_a_run_that_waited_past_its_deadline_blames_the_queue_wait(api):
    occupy(api, "batch", 1, seconds=1.5)
    deadline = (timezone.now() + timedelta(seconds=0.5)).isoformat()

    run = wait(api, submit(api, "echo", {}, tier="batch", deadline=deadline)["id"])

    assert run["sla_met"] is False
    assert run["sla_miss"] == "queue_wait"


def test_a_run_that_cannot_start_before_it_expires_ends_expired_without_running(api):
    occupy(api, "batch", 1, seconds=1.5)
    key = uuid.uuid4().hex

    run = wait(api, submit(api, "test.count", {"key": key}, tier="batch", expires_in=0.5)["id"])

    assert run["status"] == "expired"
    assert run["started_at"] is None
    assert counter("count", key) == 0


def test_the_sweeper_expires_queued_runs_past_their_expiry(api):
    occupy(api, "batch", 1, seconds=2)
    run = submit(api, "echo", {}, tier="batch", expires_in=0.2)
    time.sleep(0.3)

    report = sweep()

    assert report.expired == 1
    assert Run.objects.get(pk=run["id"]).status == RunStatus.EXPIRED


def test_expires_in_and_expires_at_together_answer_400(api):
    response = api.post(
        "/api/v1/runs/",
        {"agent": "echo", "input": {}, "expires_in": 5, "expires_at": (timezone.now() + timedelta(1)).isoformat()},
        format="json",
    )

    assert response.status_code == 400
    assert "expires_at" in response.json()


def test_a_standard_run_queued_past_its_escalation_point_is_run_by_the_critical_pool(api):
    Agent.objects.filter(name="echo").update(sla_seconds=1)
    occupy(api, "standard", 2, seconds=3)
    run = submit(api, "echo", {"escalate": True})
    time.sleep(0.6)  # past half of the 1 s SLA

    report = sweep()
    finished = wait(api, run["id"], seconds=10)

    assert report.escalated == 1
    assert finished["status"] == "succeeded"
    assert finished["escalated_at"] is not None
    assert finished["tier"] == "standard"
    assert Run.objects.get(pk=run["id"]).worker.startswith("critical-")


def due_for_escalation(count: int) -> list[Run]:
    """Standard runs queued past their escalation point (with no message: no worker takes them)."""
    return [RunFactory(escalate_at=timezone.now() - timedelta(seconds=1)) for _ in range(count)]


def critical_work(count: int, status: str) -> list[Run]:
    """Critical runs holding (running) or waiting for (queued) a process of the critical pool."""
    lease = {"worker": "critical@elsewhere", "lease_expires_at": timezone.now() + timedelta(minutes=5)}
    fields = lease if status == RunStatus.RUNNING else {}
    return [RunFactory(tier=Tier.CRITICAL, status=status, **fields) for _ in range(count)]


def test_escalation_takes_no_more_runs_than_the_critical_pool_has_idle_processes(api, settings, published):
    settings.WORKER_CONCURRENCY_CRITICAL = 4
    due_for_escalation(10)
    critical_work(1, RunStatus.RUNNING)
    critical_work(1, RunStatus.QUEUED)

    report = sweep()

    escalated = Run.objects.filter(tier=Tier.STANDARD, escalated_at__isnull=False)
    assert report.escalated == 2
    assert escalated.count() == 2
    assert sorted(run_id for message in published for run_id in message) == sorted(
        str(pk) for pk in escalated.values_list("pk", flat=True)
    )


def test_no_run_is_escalated_while_the_critical_pool_is_full(api, settings, published):
    settings.WORKER_CONCURRENCY_CRITICAL = 3
    due_for_escalation(5)
    critical_work(2, RunStatus.RUNNING)
    critical_work(1, RunStatus.QUEUED)

    report = sweep()

    assert report.escalated == 0
    assert not Run.objects.filter(escalated_at__isnull=False).exists()
    assert published == []


def test_runs_escalated_earlier_and_still_queued_count_as_critical_work(api, settings):
    settings.WORKER_CONCURRENCY_CRITICAL = 3
    for run in due_for_escalation(2):
        Run.objects.filter(pk=run.pk).update(escalated_at=timezone.now())
    due_for_escalation(5)

    report = sweep()

    assert report.escalated == 1
    assert Run.objects.filter(escalated_at__isnull=False).count() == 3


@pytest.fixture
def critical_pool_busy() -> Iterator[tuple[Run, Run]]:
    """The test critical worker's one process runs a long run, and another waits behind it; both are
    cancelled afterwards."""
    sleep = Agent.objects.get(name="sleep")
    running, behind = (RunFactory(agent=sleep, tier=Tier.CRITICAL, input={"seconds": 60}) for _ in range(2))
    run_dispatch([running])
    wait_for_status(running.pk, RunStatus.RUNNING)
    run_dispatch([behind])
    yield running, behind
    for run in (behind, running):
        run_cancel(run=Run.objects.get(pk=run.pk))


@pytest.mark.usefixtures("housekeeping_worker")
def test_the_sweeper_runs_while_every_critical_process_is_busy(critical_pool_busy):
    running, behind = critical_pool_busy
    expired = RunFactory(expires_at=timezone.now() - timedelta(seconds=1))

    sweep_task.delay()
    eventually(lambda: Run.objects.filter(pk=expired.pk, status=RunStatus.EXPIRED).exists(), what="a sweep pass")

    assert Run.objects.get(pk=running.pk).status == RunStatus.RUNNING
    assert Run.objects.get(pk=behind.pk).status == RunStatus.QUEUED


def test_runs_over_an_agent_concurrency_limit_wait_their_turn(api):
    Agent.objects.filter(name="test.concurrent").update(concurrency_limit=1)
    key = uuid.uuid4().hex

    ids = [submit(api, "test.concurrent", {"key": key, "seconds": 0.3})["id"] for _ in range(4)]
    finished = [wait(api, run_id, seconds=20) for run_id in ids]

    assert {run["status"] for run in finished} == {"succeeded"}
    assert int(redis_client().get(redis_key("test", "max", key))) == 1


def test_without_a_concurrency_limit_the_standard_pool_runs_an_agent_twice_at_once(api):
    key = uuid.uuid4().hex

    ids = [submit(api, "test.concurrent", {"key": key, "seconds": 0.5})["id"] for _ in range(4)]
    [wait(api, run_id, seconds=20) for run_id in ids]

    assert int(redis_client().get(redis_key("test", "max", key))) == 2


def test_cancelling_a_run_whose_message_a_worker_already_holds_means_it_never_starts(api):
    key = uuid.uuid4().hex
    run = submit(api, "test.count", {"key": key}, tier="batch", expires_in=600)
    wait(api, run["id"])
    Run.objects.filter(pk=run["id"]).update(status=RunStatus.QUEUED, attempts=0)
    redis_client().delete(redis_key("test", "count", key))
    run_dispatch([Run.objects.get(pk=run["id"])], countdown=2)  # held by the worker until due
    time.sleep(0.5)
    assert redis_client().llen(f"{settings.REDIS_KEY_PREFIX}batch") == 0  # prefetched, not in the queue

    api.post(f"/api/v1/runs/{run['id']}/cancel/")
    time.sleep(2.5)
    follower = wait(api, submit(api, "echo", {}, tier="batch")["id"])

    assert follower["status"] == "succeeded"
    assert Run.objects.get(pk=run["id"]).status == RunStatus.CANCELLED
    assert counter("count", key) == 0
