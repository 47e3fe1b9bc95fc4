from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from agents.models import Agent, RunStatus
from tests.factories import RunFactory, StaffFactory, UserFactory

URL = "/api/v1/stats/"


@pytest.fixture
def echo(db) -> Agent:
    return Agent.objects.get(name="echo")


def test_stats_need_credentials(db):
    assert APIClient().get(URL).status_code == 401


def test_stats_answer_per_tier_and_per_agent_over_the_last_hour_by_default(api, echo):
    RunFactory(agent=echo, submitted_by=api.user, finished=True, run_ms=120, queue_wait_ms=8)
    RunFactory(agent=echo, submitted_by=api.user, status=RunStatus.QUEUED)

    response = api.get(URL)

    body = response.json()
    assert response.status_code == 200
    assert body["window_seconds"] == 3600
    assert abs(datetime.fromisoformat(body["generated_at"]) - timezone.now()) < timedelta(minutes=1)
    assert list(body["tiers"]) == ["critical", "standard", "batch"]
    assert body["agents"]["echo"] == {
        "runs": dict.fromkeys(RunStatus.values, 0) | {"queued": 1, "succeeded": 1},
        "executed": 2,
        "cached": 0,
        "coalesced": 0,
        "sla_compliance": 100.0,
        "queue_wait_ms": {"p50": 8.0, "p95": 8.0, "p99": 8.0},
        "run_ms": {"p50": 120.0, "p95": 120.0, "p99": 120.0},
        "finished_per_minute": round(1 / 60, 3),
        "backlog": 1,
        "running_now": 0,
    }
    assert body["tiers"]["standard"] == body["agents"]["echo"]
    assert body["tiers"]["critical"]["sla_compliance"] is None


@pytest.mark.parametrize(
    ("window", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("7d", 604800)]
)
def test_the_window_parameter_sets_the_window(api, window, seconds):
    response = api.get(URL, {"window": window})

    assert response.status_code == 200
    assert response.json()["window_seconds"] == seconds


def test_the_window_parameter_leaves_out_older_runs(api, echo):
    RunFactory(agent=echo, submitted_by=api.user, finished=True, submitted_at=timezone.now() - timedelta(minutes=20))

    assert api.get(URL, {"window": "15m"}).json()["agents"]["echo"]["runs"]["succeeded"] == 0
    assert api.get(URL, {"window": "30m"}).json()["agents"]["echo"]["runs"]["succeeded"] == 1


@pytest.mark.parametrize(
    "window", ["1w", "1.5h", "-1h", "0s", "8d", "soon", "", " 1h", "1h ", "99999999999999999999s", "\x00", "\u0661h"]
)
def test_a_bad_window_answers_400_on_the_window_field(api, window):
    response = api.get(URL, {"window": window})

    assert response.status_code == 400
    assert list(response.json()) == ["window"]
    assert response.json()["window"]


def test_a_user_sees_stats_of_their_own_runs_only(api, echo):
    RunFactory(agent=echo, submitted_by=api.user, finished=True)
    RunFactory.create_batch(2, agent=echo, submitted_by=UserFactory(), status=RunStatus.QUEUED)

    body = api.get(URL).json()

    assert body["agents"]["echo"]["runs"]["succeeded"] == 1
    assert body["agents"]["echo"]["runs"]["queued"] == 0
    assert body["agents"]["echo"]["backlog"] == 0
    assert body["tiers"]["standard"]["backlog"] == 0


def test_staff_see_stats_of_all_runs(api_for, echo):
    RunFactory(agent=echo, finished=True)
    RunFactory.create_batch(2, agent=echo, status=RunStatus.QUEUED)

    body = api_for(StaffFactory()).get(URL).json()

    assert body["agents"]["echo"]["runs"]["succeeded"] == 1
    assert body["agents"]["echo"]["backlog"] == 2


def test_stats_are_described_in_the_openapi_schema(db):
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()

    operation = schema["paths"]["/api/v1/stats/"]["get"]
    assert [parameter["name"] for parameter in operation["parameters"]] == ["window"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Stats"
    }
    block = schema["components"]["schemas"]["StatsBlock"]
    assert set(block["properties"]) == {
        "runs", "executed", "cached", "coalesced", "sla_compliance", "queue_wait_ms", "run_ms",
        "finished_per_minute", "backlog", "running_now",
    }  # fmt: skip
    assert set(schema["components"]["schemas"]["RunCounts"]["properties"]) == set(RunStatus.values)


def test_the_longest_window_is_accepted_written_with_leading_zeros(api):
    assert api.get(URL, {"window": "000168h"}).json()["window_seconds"] == 7 * 86400


def test_stats_count_cached_and_coalesced_runs_apart_and_leave_them_out_of_sla_and_latency(api, echo):
    leader = RunFactory(agent=echo, submitted_by=api.user, finished=True, sla_met=False, run_ms=300, queue_wait_ms=5)
    now = timezone.now()
    RunFactory.create_batch(
        3, agent=echo, submitted_by=api.user, status=RunStatus.SUCCEEDED, cached=True, sla_met=True, finished_at=now
    )
    RunFactory(
        agent=echo, submitted_by=api.user, status=RunStatus.SUCCEEDED, follows=leader, sla_met=True, finished_at=now
    )

    block = api.get(URL).json()["agents"]["echo"]

    assert (block["executed"], block["cached"], block["coalesced"]) == (1, 3, 1)
    assert block["sla_compliance"] == 0.0
    assert block["run_ms"]["p50"] == 300.0
