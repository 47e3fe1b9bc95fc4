"""`/metrics`: Prometheus's format behind a bearer token, every process's counts added up (multiprocess mode)."""

import subprocess
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from agents.models import Run, RunStatus
from agents.runs.recovery import sweep
from scheduling.backlog import backlog_reset
from tests.debian import debian_program
from tests.factories import RunFactory
from tests.polling import eventually

TOKEN = "metrics-test-token"
RUNS = "/api/v1/runs/"
RUNS_SECONDS = 60
SLA_PARTS = ("queue_wait", "run_time")


@pytest.fixture
def scrape(client, settings):
    """Scrape /metrics with the token: every sample as {(name, labels): value}."""
    settings.METRICS_TOKEN = TOKEN

    def scraped() -> dict[tuple[str, frozenset], float]:
        response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        assert response.status_code == 200, response.content
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.content.decode())
            for sample in family.samples
        }

    return scraped


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Since:
    """How much samples grew since a first scrape (counters keep what earlier tests counted)."""

    def __init__(self, scrape) -> None:
        self.scrape = scrape
        self.before = scrape()

    def delta(self, name: str, **labels: str) -> float:
        return value(self.scrape(), name, **labels) - value(self.before, name, **labels)

    def reached(self, name: str, expected: float, **labels: str) -> float:
        """The growth once it has reached `expected`: a worker counts just after it writes the run's row."""
        eventually(lambda: self.delta(name, **labels) >= expected, seconds=10, what=f"{name} growing by {expected}")
        return self.delta(name, **labels)


@pytest.fixture
def since(scrape):
    return lambda: Since(scrape)


def submit(api, agent: str, input: dict, **fields) -> str:
    response = api.post(RUNS, {"agent": agent, "input": input, **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def finished(run_ids: list[str]) -> None:
    eventually(
        lambda: Run.objects.filter(pk__in=run_ids, status__in=RunStatus.terminal()).count() == len(run_ids),
        seconds=RUNS_SECONDS,
        what=f"{len(run_ids)} runs finishing",
    )


def promtool() -> str:
    """Debian's promtool (package prometheus), installed with apt-get when it is missing."""
    return debian_program("promtool", "prometheus")


def test_metrics_answer_401_without_the_bearer_token(client, settings):
    settings.METRICS_TOKEN = TOKEN

    missing = client.get("/metrics")
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer not-the-token")

    assert missing.status_code == wrong.status_code == 401
    assert missing["WWW-Authenticate"].startswith("Bearer")
    assert TOKEN not in missing.content.decode() + wrong.content.decode()


def test_metrics_are_not_served_while_no_token_is_set(client, settings):
    settings.METRICS_TOKEN = ""

    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer ")

    assert response.status_code == 404
    assert "METRICS_TOKEN" in response.json()["detail"]


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_runs_executed_by_worker_processes_add_up_in_one_scrape(api, since):
    metrics = since()

    finished([submit(api, "echo", {"n": n}) for n in range(6)])

    echo = {"agent": "echo", "tier": "standard"}
    assert metrics.reached("agentplatform_runs_finished_total", 6, **echo, status="succeeded") == 6
    assert metrics.reached("agentplatform_runs_submitted_total", 6, **echo, outcome="queued") == 6
    assert metrics.reached("agentplatform_run_duration_seconds_count", 6, tier="standard") >= 6


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_failures_retries_and_sla_misses_are_counted(api, since):
    metrics = since()

    failing = submit(api, "test.flaky", {"fail_times": 10})
    late = submit(api, "sleep", {"seconds": 2}, deadline=(timezone.now() + timedelta(seconds=1)).isoformat())
    finished([failing, late])

    flaky = {"agent": "test.flaky", "tier": "standard"}
    assert metrics.reached("agentplatform_runs_finished_total", 1, **flaky, status="failed") == 1
    # max_retries is 3: three attempts were queued again before the fourth failed for good
    assert metrics.delta("agentplatform_run_retries_total", **flaky) == 3
    # which part overran depends on how soon a worker took the run: the miss is counted once either way
    sleep = {"agent": "sleep", "tier": "standard"}
    eventually(
        lambda: sum(metrics.delta("agentplatform_sla_missed_total", **sleep, part=part) for part in SLA_PARTS) >= 1,
        what="the SLA miss counted",
    )
    assert sum(metrics.delta("agentplatform_sla_missed_total", **sleep, part=part) for part in SLA_PARTS) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_cached_answer_counts_as_a_hit_and_a_run_answered_from_the_cache(api, since):
    input = {"key": "metrics-cache", "value": 7}
    finished([submit(api, "test.cached_count", input)])
    metrics = since()

    cached = submit(api, "test.cached_count", input)

    assert Run.objects.get(pk=cached).cached
    labels = {"agent": "test.cached_count", "tier": "standard"}
    assert metrics.delta("agentplatform_runs_submitted_total", **labels, outcome="cached") == 1
    assert metrics.delta("agentplatform_runs_finished_total", **labels, status="succeeded") == 1
    assert metrics.delta("agentplatform_result_cache_lookups_total", agent="test.cached_count", result="hit") == 1


def test_admission_refusals_are_counted_by_tier_and_reason(api, since, settings):
    settings.TIER_BACKLOG_LIMITS = {"critical": 10, "standard": 1, "batch": 10}
    settings.BACKLOG_USER_SHARE = 1.0
    api.post(RUNS, {"agent": "echo", "input": {}}, format="json")
    metrics = since()

    response = api.post(
        f"{RUNS}batch/", {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(3)]}, format="json"
    )

    assert response.status_code == 429
    assert metrics.delta("agentplatform_runs_refused_total", tier="standard", reason="tier_backlog") == 3


def test_runs_refused_for_the_submission_rate_are_counted(api, since, settings):
    settings.API_SUBMIT_RATE = "2/minute"
    api.post(RUNS, {"agent": "echo", "input": {}}, format="json")
    metrics = since()

    response = api.post(
        f"{RUNS}batch/", {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(2)]}, format="json"
    )

    assert response.status_code == 429
    assert metrics.delta("agentplatform_runs_rate_limited_total") == 2


def test_a_sweeper_pass_counts_what_it_did(transactional_db, since):
    RunFactory(expires_at=timezone.now() - timedelta(seconds=1))
    metrics = since()

    sweep()

    assert metrics.delta("agentplatform_sweeper_passes_total") == 1
    assert metrics.delta("agentplatform_sweeper_actions_total", action="expired") == 1


def test_the_backlog_of_each_tier_and_agent_is_read_from_redis_when_scraped(db, scrape):
    backlog_reset({"tier:batch": 7, "agent:factorize": 7, "user:1:batch": 7})

    samples = scrape()

    assert value(samples, "agentplatform_backlog_runs", tier="batch") == 7
    assert value(samples, "agentplatform_backlog_runs", tier="critical") == 0
    assert value(samples, "agentplatform_agent_backlog_runs", agent="factorize") == 7


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_scrape_after_real_runs_passes_promtool_check_metrics(api, client, settings):
    settings.METRICS_TOKEN = TOKEN
    finished([submit(api, "echo", {"n": 1}), submit(api, "test.flaky", {"fail_times": 1})])
    body = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content

    check = subprocess.run([promtool(), "check", "metrics"], input=body, capture_output=True, timeout=60)

    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    assert b"agentplatform_run_duration_seconds_bucket" in body
