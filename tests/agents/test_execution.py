"""Runs executed by real Celery workers, one per tier, on real Redis and PostgreSQL."""

import time
import uuid

import pytest
from django.contrib.auth.models import Permission

from agentplatform.celery import app
from agents.models import Agent, Run, RunStatus
from agents.runs.dispatch import EXECUTE_RUN_TASK
from scheduling.tiers import Tier
from tests.factories import RunFactory
from tests.polling import eventually
from tests.sample_agents import executions

pytestmark = pytest.mark.usefixtures("transactional_db", "workers")


def submit(api, agent: str, input: dict, **fields) -> dict:
    response = api.post("/api/v1/runs/", {"agent": agent, "input": input, **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def wait(api, run_id: str, seconds: float = 20) -> dict:
    return api.get(f"/api/v1/runs/{run_id}/", {"wait": seconds}).json()


def wait_for_status(run_id: str, status: str, seconds: float = 10) -> Run:
    return eventually(
        lambda: Run.objects.filter(pk=run_id, status=status).first(), seconds=seconds, what=f"run {run_id} {status}"
    )


def test_echo_returns_its_input(api):
    run = wait(api, submit(api, "echo", {"hello": "world", "n": [1, 2]})["id"])

    assert run["status"] == "succeeded"
    assert run["result"] == {"hello": "world", "n": [1, 2]}
    assert run["attempts"] == 1


def test_a_finished_run_records_its_timings_and_sla(api):
    run = wait(api, submit(api, "sleep", {"seconds": 0.2})["id"])

    assert run["status"] == "succeeded"
    assert run["result"]["slept"] >= 0.2
    assert run["run_ms"] >= 200
    assert run["queue_wait_ms"] >= 0
    assert run["started_at"] is not None
    assert run["finished_at"] is not None
    assert run["sla_met"] is True


def test_text_stats_counts_words_sentences_and_top_terms(api):
    text = "The cat sat on the mat. The cat slept! Did the dog bark?"

    run = wait(api, submit(api, "text_stats", {"text": text, "top": 2})["id"])

    assert run["status"] == "succeeded"
    assert run["result"]["words"] == 13
    assert run["result"]["sentences"] == 3
    assert run["result"]["top_terms"][0] == {"term": "cat", "count": 2}
    assert run["result"]["reading_time_seconds"] > 0


def test_factorize_runs_on_the_batch_worker(api):
    n = 1_000_000_007 * 998_244_353

    run = wait(api, submit(api, "factorize", {"n": n})["id"])

    assert run["status"] == "succeeded"
    assert run["result"]["factors"] == [998_244_353, 1_000_000_007]
    assert run["tier"] == "batch"
    assert Run.objects.get(pk=run["id"]).worker.startswith("batch-")


def test_spin_burns_cpu_on_a_worker(api):
    run = wait(api, submit(api, "spin", {"ms": 5})["id"])

    assert run["status"] == "succeeded"
    assert run["result"]["cpu_ms"] >= 5


@pytest.mark.parametrize("tier", list(Tier))
def test_each_tier_is_run_by_its_own_worker(api, tier):
    api.user.user_permissions.add(Permission.objects.get(codename="submit_critical"))
    run = wait(api, submit(api, "echo", {}, tier=tier.value)["id"])

    assert run["status"] == "succeeded"
    assert Run.objects.get(pk=run["id"]).worker.startswith(f"{tier.value}-")


def test_a_batch_of_runs_is_executed(api):
    body = {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(20)]}
    ids = [run["id"] for run in api.post("/api/v1/runs/batch/", body, format="json").json()]

    results = [wait(api, run_id) for run_id in ids]

    assert [run["result"]["n"] for run in results] == list(range(20))


def test_wait_answers_when_the_run_finishes_not_when_the_wait_ends(api):
    run_id = submit(api, "sleep", {"seconds": 0.5})["id"]

    started = time.monotonic()
    run = wait(api, run_id, seconds=20)

    assert run["status"] == "succeeded"
    assert time.monotonic() - started < 10


def test_wait_answers_after_the_wait_when_the_run_is_still_running(api):
    run_id = submit(api, "sleep", {"seconds": 5})["id"]

    run = wait(api, run_id, seconds=0.5)

    assert run["status"] in {"queued", "running"}
    api.post(f"/api/v1/runs/{run_id}/cancel/")


def test_a_failing_agent_is_retried_then_succeeds(api):
    run = wait(api, submit(api, "test.flaky", {"fail_times": 2})["id"])

    assert run["status"] == "succeeded"
    assert run["attempts"] == 3
    assert run["result"] == {"attempt": 3}
    assert run["error"] is None


def test_a_failing_agent_out_of_retries_ends_failed_with_its_traceback(api):
    run = wait(api, submit(api, "test.flaky", {"fail_times": 10})["id"])

    assert run["status"] == "failed"
    assert run["attempts"] == 4  # the first attempt and max_retries=3
    assert run["error"]["type"] == "RuntimeError"
    assert run["error"]["message"] == "attempt 4 fails on purpose"
    assert "Traceback" in run["error"]["traceback"]
    assert "sample_agents.py" in run["error"]["traceback"]
    assert run["sla_met"] is False


def test_retries_follow_the_agent_max_retries_tuned_in_the_database(api):
    Agent.objects.filter(name="test.flaky").update(max_retries=0)

    run = wait(api, submit(api, "test.flaky", {"fail_times": 1})["id"])

    assert run["status"] == "failed"
    assert run["attempts"] == 1


def test_the_soft_time_limit_tuned_in_the_database_stops_the_agent(api):
    Agent.objects.filter(name="sleep").update(soft_time_limit=0.5, time_limit=5)

    run = wait(api, submit(api, "sleep", {"seconds": 10})["id"])

    assert run["status"] == "failed"
    assert run["error"]["type"] == "SoftTimeLimitExceeded"
    assert run["run_ms"] < 5000


def test_an_agent_that_ignores_its_soft_limit_is_killed_at_the_hard_limit(api):
    run = wait(api, submit(api, "test.stubborn", {"seconds": 30})["id"], seconds=25)

    assert run["status"] == "failed"
    assert run["error"]["type"] == "TimeLimitExceeded"


def test_cancelling_a_queued_run_means_it_never_starts(api):
    key = uuid.uuid4().hex
    blocker = submit(api, "sleep", {"seconds": 1.5}, tier="batch")
    wait_for_status(blocker["id"], RunStatus.RUNNING)
    queued = submit(api, "test.count", {"key": key}, tier="batch")

    cancelled = api.post(f"/api/v1/runs/{queued['id']}/cancel/")
    wait(api, blocker["id"])
    follower = wait(api, submit(api, "echo", {}, tier="batch")["id"])

    assert cancelled.json()["status"] == "cancelled"
    assert follower["status"] == "succeeded"  # the batch worker got past the cancelled message
    assert Run.objects.get(pk=queued["id"]).status == RunStatus.CANCELLED
    assert executions(key) == 0


def test_cancelling_a_running_run_stops_it_and_frees_the_worker(api):
    api.user.user_permissions.add(Permission.objects.get(codename="submit_critical"))
    running = submit(api, "sleep", {"seconds": 60}, tier="critical")
    wait_for_status(running["id"], RunStatus.RUNNING)

    response = api.post(f"/api/v1/runs/{running['id']}/cancel/")
    follower = wait(api, submit(api, "echo", {"after": "cancel"}, tier="critical")["id"], seconds=10)

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert follower["status"] == "succeeded"  # the single critical process is free again
    run = Run.objects.get(pk=running["id"])
    assert run.status == RunStatus.CANCELLED
    assert run.result is None


def test_a_duplicate_delivery_loses_the_claim_and_does_nothing(api):
    key = uuid.uuid4().hex
    run = submit(api, "test.count", {"key": key, "seconds": 0.5})
    wait_for_status(run["id"], RunStatus.RUNNING)

    app.send_task(EXECUTE_RUN_TASK, args=[run["id"]], queue=Tier.STANDARD.queue)
    finished = wait(api, run["id"])
    time.sleep(1)

    assert finished["status"] == "succeeded"
    assert executions(key) == 1
    assert Run.objects.get(pk=run["id"]).attempts == 1


def test_a_redelivered_message_for_a_finished_run_does_nothing(api):
    key = uuid.uuid4().hex
    run = wait(api, submit(api, "test.count", {"key": key})["id"])

    app.send_task(EXECUTE_RUN_TASK, args=[run["id"]], queue=Tier.STANDARD.queue)
    follower = wait(api, submit(api, "echo", {})["id"])

    assert follower["status"] == "succeeded"
    assert executions(key) == 1


def test_a_worker_never_runs_an_agent_the_code_does_not_declare(api):
    # A row a tampered database could hold: it names no code the registry knows.
    rogue = Agent.objects.create(name="os.system", version="1", sla_seconds=5, soft_time_limit=5, time_limit=5)
    run = RunFactory(agent=rogue, input={"command": "true"}, submitted_by=api.user)
    app.send_task(EXECUTE_RUN_TASK, args=[str(run.pk)], queue=Tier.STANDARD.queue)

    failed = wait_for_status(str(run.pk), RunStatus.FAILED)

    assert failed.error["type"] == "AgentNotRegistered"
    assert failed.result is None


def test_an_agent_submits_child_runs_and_publishes_on_topics(api):
    parent = wait(api, submit(api, "test.parent", {"message": "hi"})["id"])

    child = wait(api, parent["result"]["child"])

    assert child["status"] == "succeeded"
    assert child["result"] == {"message": "hi"}
    assert str(Run.objects.get(pk=child["id"]).parent_id) == parent["id"]
