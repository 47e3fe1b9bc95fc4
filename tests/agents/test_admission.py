"""Admission control and submission rates through the API (no workers: runs stay queued)."""

import socket

import pytest

from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunStatus
from agents.runs.recovery import backlog_recount
from caching.results import result_cache_put
from scheduling.backlog import backlog_key, user_field
from tests.factories import RunFactory, UserFactory
from tests.polling import eventually

RUNS = "/api/v1/runs/"


@pytest.fixture
def limits(settings):
    """Tier limits as given; one user may fill a whole tier unless `user_share` says otherwise."""

    def set_limits(critical=100, standard=100, batch=100, user_share=1.0):
        settings.TIER_BACKLOG_LIMITS = {"critical": critical, "standard": standard, "batch": batch}
        settings.BACKLOG_USER_SHARE = user_share

    return set_limits


def submit(api, agent="echo", tier=None, **fields):
    body = {"agent": agent, "input": {}, **({"tier": tier} if tier else {}), **fields}
    return api.post(RUNS, body, format="json")


def test_a_submission_over_the_tier_backlog_limit_answers_429_with_retry_after(api, limits):
    limits(batch=2)
    submit(api, tier="batch")
    submit(api, tier="batch")

    response = submit(api, tier="batch")

    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1
    assert "limit is 2" in response.json()["detail"]
    assert Run.objects.count() == 2


def test_other_tiers_are_admitted_while_one_is_full(api, limits):
    limits(batch=1)
    submit(api, tier="batch")

    assert submit(api, tier="standard").status_code == 201


def test_a_batch_submission_over_the_limit_is_refused_whole(api, limits):
    limits(standard=3)
    body = {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(4)]}

    response = api.post(f"{RUNS}batch/", body, format="json")

    assert response.status_code == 429
    assert not Run.objects.exists()


def test_batch_is_refused_first_while_standard_fills_up(api, limits):
    limits(standard=4, batch=100)
    for _ in range(3):
        submit(api, tier="standard")

    batch = submit(api, tier="batch")
    standard = submit(api, tier="standard")

    assert batch.status_code == 429
    assert standard.status_code == 201


def test_an_agent_backlog_limit_overrides_the_tier_limit(api, limits):
    limits(standard=100)
    Agent.objects.filter(name="echo").update(backlog_limit=1)
    submit(api)

    refused = submit(api)
    other = submit(api, agent="sleep", input={"seconds": 1})

    assert refused.status_code == 429
    assert "agent 'echo'" in refused.json()["detail"]
    assert other.status_code == 201


def test_submissions_over_the_user_rate_answer_429_with_retry_after(api, settings):
    settings.API_SUBMIT_RATE = "2/minute"

    statuses = [submit(api).status_code for _ in range(3)]
    response = submit(api)

    assert statuses == [201, 201, 429]
    assert int(response["Retry-After"]) > 0
    assert Run.objects.count() == 2


def test_reads_do_not_count_against_the_submission_rate(api, settings):
    settings.API_SUBMIT_RATE = "1/minute"

    assert [api.get(RUNS).status_code for _ in range(3)] == [200, 200, 200]
    assert submit(api).status_code == 201


def test_the_submission_rate_counts_runs_not_requests(api, settings):
    settings.API_SUBMIT_RATE = "5/minute"
    batch = {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(4)]}

    first = api.post(f"{RUNS}batch/", batch, format="json")
    second = api.post(f"{RUNS}batch/", batch, format="json")
    single = submit(api)

    assert (first.status_code, second.status_code, single.status_code) == (201, 429, 201)
    assert "rate of 5" in second.json()["detail"]
    assert Run.objects.count() == 5


def test_a_submission_refused_for_the_rate_holds_no_place_in_the_backlog(api, settings):
    settings.API_SUBMIT_RATE = "0/minute"

    response = submit(api)

    assert response.status_code == 429
    # the place reserved in the same round trip as the rate's count is given back
    assert int(redis_client().hget(backlog_key(), user_field(api.user.pk, "standard")) or 0) == 0
    assert not Run.objects.exists()


def test_answers_from_the_result_cache_count_against_the_submission_rate(api, settings):
    settings.API_SUBMIT_RATE = "2/minute"
    version = Agent.objects.get(name="factorize").version
    result_cache_put(agent="factorize", version=version, input={"n": 10403}, result={"factors": [101, 103]}, ttl=60)

    responses = [submit(api, agent="factorize", input={"n": 10403}) for _ in range(3)]

    assert [response.status_code for response in responses] == [201, 201, 429]
    assert [response.json()["cached"] for response in responses[:2]] == [True, True]
    assert Run.objects.count() == 2


def test_an_invalid_submission_does_not_count_against_the_submission_rate(api, settings):
    settings.API_SUBMIT_RATE = "1/minute"

    refused = submit(api, agent="no.such.agent")
    accepted = submit(api)

    assert (refused.status_code, accepted.status_code) == (400, 201)


def test_a_user_over_their_share_of_the_tier_backlog_gets_429_naming_the_share_with_retry_after(api, limits):
    limits(standard=4, user_share=0.5)
    submit(api)
    submit(api)

    response = submit(api)

    assert response.status_code == 429
    assert "share is 50% of the tier's limit, 2 runs" in response.json()["detail"]
    assert int(response["Retry-After"]) >= 1
    assert Run.objects.count() == 2


def test_other_users_are_admitted_while_one_user_holds_their_whole_share(api, api_for, limits):
    limits(standard=4, user_share=0.5)
    submit(api)
    submit(api)

    assert submit(api_for(UserFactory())).status_code == 201


def test_a_users_share_is_counted_per_tier(api, limits):
    limits(standard=4, batch=4, user_share=0.5)
    submit(api)
    submit(api)

    assert submit(api, tier="batch").status_code == 201


def test_a_batch_bigger_than_the_users_share_is_refused_whole(api, limits):
    limits(standard=10, user_share=0.2)
    body = {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(3)]}

    response = api.post(f"{RUNS}batch/", body, format="json")

    assert response.status_code == 429
    assert "share" in response.json()["detail"]
    assert not Run.objects.exists()


def test_a_refused_submission_takes_no_place_in_the_users_share(api, limits):
    limits(standard=10, user_share=0.2)
    api.post(f"{RUNS}batch/", {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(3)]}, format="json")

    assert [submit(api).status_code for _ in range(3)] == [201, 201, 429]


def test_the_sweeper_recounts_each_users_queued_runs_per_tier(db, limits):
    first, second = UserFactory(), UserFactory()
    RunFactory.create_batch(2, submitted_by=first)
    RunFactory(submitted_by=first, tier="batch")
    RunFactory(submitted_by=second)
    RunFactory(submitted_by=second, status=RunStatus.SUCCEEDED)
    redis_client().hset(backlog_key(), mapping={user_field(first.pk, "standard"): 40, user_field(99, "batch"): 3})

    backlog_recount()

    counts = {field.decode(): int(value) for field, value in redis_client().hgetall(backlog_key()).items()}
    assert {field: value for field, value in counts.items() if field.startswith("user:")} == {
        user_field(first.pk, "standard"): 2,
        user_field(first.pk, "batch"): 1,
        user_field(second.pk, "standard"): 1,
    }


@pytest.fixture
def redis_unreachable(settings):
    """Redis as the platform's client sees it: a loopback port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The client is built per URL (agentplatform.redis_client), so the new URL gets a client of its own.
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize(
    ("url", "body"),
    [
        (RUNS, {"agent": "echo", "input": {"n": 1}}),
        (RUNS, {"agent": "factorize", "input": {"n": 15}}),
        (f"{RUNS}batch/", {"runs": [{"agent": "echo", "input": {"n": 1}}, {"agent": "echo", "input": {"n": 2}}]}),
    ],
    ids=["single", "cacheable", "batch"],
)
def test_a_submission_is_stored_queued_when_redis_cannot_be_reached(api, redis_unreachable, caplog, url, body):
    response = api.post(url, body, format="json")

    assert response.status_code == 201
    runs = response.json() if isinstance(response.json(), list) else [response.json()]
    assert {run["status"] for run in runs} == {"queued"}
    assert Run.objects.filter(pk__in=[run["id"] for run in runs], status=RunStatus.QUEUED).count() == len(runs)
    assert any(record.levelname == "WARNING" and "rate" in record.getMessage() for record in caplog.records)
    assert any(record.levelname == "WARNING" and "backlog" in record.getMessage() for record in caplog.records)


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_runs_claimed_by_a_worker_give_back_their_place_in_the_users_share(transactional_db, api, limits):
    limits(standard=4, user_share=0.5)
    ids = [submit(api, input={"n": n}).json()["id"] for n in range(2)]
    eventually(
        lambda: Run.objects.filter(pk__in=ids, status=RunStatus.SUCCEEDED).count() == 2, what="both runs finished"
    )

    assert [submit(api, input={"n": n}).status_code for n in range(2, 4)] == [201, 201]
