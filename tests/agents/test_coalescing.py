"""Identical runs of a cacheable agent in flight at once share one execution (coalescing)."""

import threading

import pytest
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunStatus
from agents.runs.coalescing import runs_lead
from agents.runs.execute import runs_claim
from agents.runs.finish import Attempt, attempts_record, held_by
from agents.runs.inflight import inflight_key
from agents.runs.recovery import backlog_recount, sweep
from agents.runs.submit import RunRequest, run_submit
from caching.results import result_cache_put
from tests.factories import RunFactory
from tests.polling import eventually
from tests.sample_agents import executions

RUNS = "/api/v1/runs/"
AGENT = "test.cached_count"


def submit(api, input: dict, **extra) -> dict:
    response = api.post(RUNS, {"agent": AGENT, "input": input, **extra}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def leader_in_flight(key: str, tier: str = "standard") -> Run:
    """A queued run of the agent holding the in-flight key of its input, with no message for it."""
    agent = Agent.objects.get(name=AGENT)
    leader = RunFactory(agent=agent, input=agent_input(key), tier=tier)
    assert runs_lead([leader]) == [leader]
    return leader


def agent_input(key: str) -> dict:
    """The input as the agent's schema stores it, defaults included."""
    return {"key": key, "seconds": 0.0, "value": 0}


def finish_leader(run_id: str, result: dict) -> None:
    """What a worker does with the leader: claim it and record its result."""
    (run,) = runs_claim(run_ids=[run_id], worker="w1")
    now = timezone.now()
    attempts_record([Attempt(run=run, started_at=now, finished_at=now, run_ms=5, result=result)], held=held_by(run))


def wait_terminal(run_ids: list[str], seconds: float = 30) -> list[Run]:
    def finished() -> list[Run] | None:
        runs = list(Run.objects.filter(pk__in=run_ids))
        return runs if all(run.is_terminal for run in runs) else None

    return eventually(finished, seconds=seconds, what="every run finishing")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("workers")
def test_fifty_concurrent_identical_submissions_run_the_agent_once(api):
    token = api._credentials["HTTP_AUTHORIZATION"]
    input = {"key": "fifty", "seconds": 1.0}
    ids: list[str] = []
    start = threading.Barrier(50)

    def client_submits() -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=token)
        start.wait()
        try:
            ids.append(submit(client, input)["id"])
        finally:
            connection.close()

    threads = [threading.Thread(target=client_submits) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    runs = wait_terminal(ids)
    assert executions("fifty") == 1
    assert {run.status for run in runs} == {RunStatus.SUCCEEDED}
    assert {run.result["executions"] for run in runs} == {1}
    (leader,) = [run for run in runs if run.follows_id is None and not run.cached]
    followers = [run for run in runs if run.follows_id is not None]
    assert len(followers) + sum(run.cached for run in runs) == 49
    assert {run.follows_id for run in followers} == {leader.pk}


@pytest.mark.django_db(transaction=True)
def test_identical_runs_in_one_batch_send_one_message(api, published):
    item = {"agent": AGENT, "input": {"key": "batch"}}

    runs = api.post(f"{RUNS}batch/", {"runs": [item, item, item]}, format="json").json()

    leader = runs[0]
    assert [run["follows"] for run in runs] == [None, leader["id"], leader["id"]]
    assert published == [[leader["id"]]]


@pytest.mark.django_db(transaction=True)
def test_a_run_submitted_while_an_identical_one_is_queued_follows_it(api, published):
    leader = leader_in_flight("later")

    follower = submit(api, {"key": "later"})

    assert (follower["status"], follower["follows"]) == ("queued", str(leader.pk))
    assert published == []


@pytest.mark.django_db(transaction=True)
def test_followers_finish_with_the_leaders_result(api):
    leader = leader_in_flight("share")
    follower = submit(api, {"key": "share"})

    finish_leader(leader.pk, {"answer": 42})

    run = Run.objects.get(pk=follower["id"])
    assert (run.status, run.result, run.sla_met, run.follows_id) == ("succeeded", {"answer": 42}, True, leader.pk)
    assert not redis_client().exists(inflight_key(run))


@pytest.mark.django_db(transaction=True)
def test_followers_fail_with_the_error_of_a_leader_out_of_attempts(api):
    leader = leader_in_flight("fails")
    follower = submit(api, {"key": "fails"})
    (run,) = runs_claim(run_ids=[leader.pk], worker="w1")
    now = timezone.now()

    error = {"type": "ValueError", "message": "bad", "traceback": ""}
    attempts_record([Attempt(run=run, started_at=now, finished_at=now, run_ms=3, error=error)], held=held_by(run))

    followed = Run.objects.get(pk=follower["id"])
    assert followed.status == RunStatus.FAILED
    assert followed.error["type"] == "ValueError"
    assert str(leader.pk) in followed.error["message"]


@pytest.mark.django_db(transaction=True)
def test_cancelling_the_leader_hands_the_work_to_its_oldest_follower(api, published):
    leader = leader_in_flight("heir")
    leader.submitted_by = api.user
    leader.save()
    heir = submit(api, {"key": "heir"})
    third = submit(api, {"key": "heir"})

    assert api.post(f"{RUNS}{leader.pk}/cancel/").status_code == 200

    runs = {str(run.pk): run for run in Run.objects.filter(pk__in=[heir["id"], third["id"]])}
    assert runs[heir["id"]].follows_id is None
    assert str(runs[third["id"]].follows_id) == heir["id"]
    assert published == [[heir["id"]]]


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_follower_leaves_the_leader_and_the_others(api):
    leader = leader_in_flight("leave")
    quitter = submit(api, {"key": "leave"})
    stayer = submit(api, {"key": "leave"})

    api.post(f"{RUNS}{quitter['id']}/cancel/")
    finish_leader(leader.pk, {"ok": True})

    statuses = dict(Run.objects.filter(pk__in=[quitter["id"], stayer["id"]]).values_list("pk", "status"))
    assert {str(pk): status for pk, status in statuses.items()} == {
        quitter["id"]: "cancelled",
        stayer["id"]: "succeeded",
    }


@pytest.mark.django_db(transaction=True)
def test_a_critical_run_never_follows_a_batch_run(api, published):
    api.user.user_permissions.add(Permission.objects.get(codename="submit_critical"))
    leader_in_flight("tiers", tier="batch")

    critical = submit(api, {"key": "tiers"}, tier="critical")

    assert critical["follows"] is None
    assert published == [[critical["id"]]]


@pytest.mark.django_db(transaction=True)
def test_a_batch_run_follows_an_identical_critical_run(api):
    leader = leader_in_flight("downhill", tier="critical")

    batch = submit(api, {"key": "downhill"}, tier="batch")

    assert batch["follows"] == str(leader.pk)


@pytest.mark.django_db(transaction=True)
def test_the_most_urgent_follower_takes_over_a_cancelled_leader(api, published):
    leader = leader_in_flight("urgent")
    leader.submitted_by = api.user
    leader.save()
    older_batch = submit(api, {"key": "urgent"}, tier="batch")
    newer_standard = submit(api, {"key": "urgent"})

    api.post(f"{RUNS}{leader.pk}/cancel/")

    assert published == [[newer_standard["id"]]]
    assert str(Run.objects.get(pk=older_batch["id"]).follows_id) == newer_standard["id"]


@pytest.mark.django_db(transaction=True)
def test_a_bypass_submission_runs_on_its_own(api, published):
    leader_in_flight("own")

    bypass = submit(api, {"key": "own"}, cache="bypass")

    assert bypass["follows"] is None
    assert published == [[bypass["id"]]]


@pytest.mark.django_db(transaction=True)
def test_different_inputs_do_not_follow_each_other(api, published):
    leader_in_flight("a")

    second = submit(api, {"key": "b"})

    assert second["follows"] is None
    assert published == [[second["id"]]]


@pytest.mark.django_db(transaction=True)
def test_a_key_left_by_an_ended_leader_is_taken_over(api, published):
    ended = leader_in_flight("stale")
    Run.objects.filter(pk=ended.pk).update(status=RunStatus.FAILED)

    run = submit(api, {"key": "stale"})

    assert run["follows"] is None
    assert published == [[run["id"]]]


@pytest.mark.django_db(transaction=True)
def test_followers_do_not_count_against_the_backlog(api, settings):
    settings.TIER_BACKLOG_LIMITS = {**settings.TIER_BACKLOG_LIMITS, "standard": 1}
    leader_in_flight("backlog")
    backlog_recount()  # the leader was stored directly: count it, as the sweeper does

    response = api.post(RUNS, {"agent": AGENT, "input": {"key": "backlog"}}, format="json")
    refused = api.post(RUNS, {"agent": AGENT, "input": {"key": "other"}}, format="json")

    assert response.status_code == 201
    assert refused.status_code == 429


@pytest.mark.django_db(transaction=True)
def test_a_run_arriving_as_its_leader_succeeds_gets_the_result_without_running(api, published):
    leader = leader_in_flight("just-done")
    # The leader's outcome is written; it has not yet given up its key.
    Run.objects.filter(pk=leader.pk).update(status=RunStatus.SUCCEEDED, result={"n": 2}, finished_at=timezone.now())

    follower = submit(api, {"key": "just-done"})

    run = Run.objects.get(pk=follower["id"])
    assert (run.status, run.result, run.follows_id) == (RunStatus.SUCCEEDED, {"n": 2}, leader.pk)
    assert published == []


@pytest.mark.django_db(transaction=True)
def test_a_new_leader_finds_a_result_stored_since_it_was_submitted(user):
    agent = Agent.objects.get(name=AGENT)
    run = RunFactory(agent=agent, input=agent_input("stored"), submitted_by=user)
    result_cache_put(agent=AGENT, version=agent.version, input=run.input, result={"n": 3}, ttl=60)

    assert runs_lead([run]) == []

    run.refresh_from_db()
    assert (run.status, run.result, run.cached) == (RunStatus.SUCCEEDED, {"n": 3}, True)
    assert not redis_client().exists(inflight_key(run))


@pytest.mark.django_db(transaction=True)
def test_a_follower_whose_leader_ends_before_it_is_committed_still_finishes(user):
    leader = leader_in_flight("uncommitted")

    with transaction.atomic():
        follower, _ = run_submit(user=user, request=RunRequest(agent=AGENT, input={"key": "uncommitted"}))
        # Another process finishes the leader while this submission is not yet committed.
        other = threading.Thread(target=lambda: (finish_leader(leader.pk, {"n": 4}), connection.close()))
        other.start()
        other.join()

    follower.refresh_from_db()
    assert (follower.status, follower.result, follower.follows_id) == (RunStatus.SUCCEEDED, {"n": 4}, leader.pk)


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_settles_followers_of_a_leader_that_ended_without_them(api):
    leader = leader_in_flight("crash")
    follower = submit(api, {"key": "crash"})
    # The leader's worker wrote its outcome and died before settling its followers.
    Run.objects.filter(pk=leader.pk).update(status=RunStatus.SUCCEEDED, result={"n": 1})

    report = sweep()

    assert report.settled_followers == 1
    assert Run.objects.get(pk=follower["id"]).result == {"n": 1}


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_never_dispatches_a_follower(api, published, settings):
    settings.SWEEP_QUEUED_AFTER_SECONDS = 0
    leader = leader_in_flight("quiet")
    submit(api, {"key": "quiet"})

    sweep()

    assert published == [[str(leader.pk)]]
