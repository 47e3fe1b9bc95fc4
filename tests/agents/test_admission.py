"""Admission control and submission rates through the API (no workers: runs stay queued)."""

import pytest

from agents.models import Agent, Run

RUNS = "/api/v1/runs/"


@pytest.fixture
def limits(settings):
    def set_limits(critical=100, standard=100, batch=100):
        settings.TIER_BACKLOG_LIMITS = {"critical": critical, "standard": standard, "batch": batch}

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

    assert submit(api, tier="critical").status_code == 201


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
