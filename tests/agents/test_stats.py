import random
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from agents import stats as stats_module
from agents.models import Agent, Run, RunStatus
from agents.stats import agent_stats, parse_window, percentile_cont, run_stats, tier_stats
from scheduling.tiers import Tier
from tests.factories import RunFactory, StaffFactory

HOUR = timedelta(hours=1)


@pytest.fixture
def echo(db) -> Agent:
    return Agent.objects.get(name="echo")


@pytest.fixture
def factorize(db) -> Agent:
    return Agent.objects.get(name="factorize")


def database_percentiles(values: list[float], fractions: list[float]) -> list[float] | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT percentile_cont(%s::double precision[]) WITHIN GROUP (ORDER BY v)"
            " FROM unnest(%s::double precision[]) AS v",
            [fractions, values],
        )
        return cursor.fetchone()[0]


def test_percentile_cont_interpolates_between_the_closest_ranks():
    values = list(range(100, 0, -1))  # order does not matter

    assert percentile_cont(values, 0.5) == pytest.approx(50.5)
    assert percentile_cont(values, 0.95) == pytest.approx(95.05)
    assert percentile_cont(values, 0.99) == pytest.approx(99.01)
    assert percentile_cont(values, 0.0) == 1
    assert percentile_cont(values, 1.0) == 100


def test_percentile_cont_of_one_value_is_that_value_and_of_none_is_none():
    assert percentile_cont([7], 0.95) == 7
    assert percentile_cont([], 0.5) is None


@pytest.mark.django_db
@pytest.mark.parametrize(
    "values",
    [
        list(range(1, 101)),
        [5],
        [1, 1000],
        [3, 3, 3, 9],
        random.Random(7).choices(range(100_000), k=997),
        [random.Random(11).expovariate(0.01) for _ in range(250)],
    ],
    ids=["1-100", "one", "two", "ties", "random-ints", "random-floats"],
)
def test_python_percentiles_agree_with_postgres_percentile_cont(values):
    fractions = [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]

    in_python = [percentile_cont(values, fraction) for fraction in fractions]

    assert in_python == pytest.approx(database_percentiles(values, fractions), rel=1e-12)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("7d", 604800)])
def test_parse_window_reads_a_number_and_a_unit(text, seconds):
    assert parse_window(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "1w", "1.5h", "-1h", "1 h", "0s", "8d", "168h1s", "10081m"])
def test_parse_window_refuses_other_forms_and_out_of_range_windows(text):
    with pytest.raises(ValueError, match="window"):
        parse_window(text)


@pytest.mark.django_db
def test_runs_are_counted_by_status_per_tier_and_per_agent(echo, factorize):
    RunFactory.create_batch(2, agent=echo, status=RunStatus.QUEUED)
    RunFactory(agent=echo, status=RunStatus.RUNNING)
    RunFactory.create_batch(3, agent=echo, finished=True)
    RunFactory(agent=echo, tier=Tier.CRITICAL, status=RunStatus.FAILED)
    RunFactory(agent=factorize, status=RunStatus.EXPIRED)
    RunFactory(agent=factorize, status=RunStatus.CANCELLED)

    stats = run_stats(runs=Run.objects.all(), window=HOUR)

    assert stats["tiers"]["standard"]["runs"] == {
        "queued": 2, "running": 1, "succeeded": 3, "failed": 0, "cancelled": 0, "expired": 0,
    }  # fmt: skip
    assert stats["tiers"]["critical"]["runs"] == {
        "queued": 0, "running": 0, "succeeded": 0, "failed": 1, "cancelled": 0, "expired": 0,
    }  # fmt: skip
    assert stats["tiers"]["batch"]["runs"] == {
        "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1, "expired": 1,
    }  # fmt: skip
    assert stats["agents"]["echo"]["runs"] == {
        "queued": 2, "running": 1, "succeeded": 3, "failed": 1, "cancelled": 0, "expired": 0,
    }  # fmt: skip
    assert stats["agents"]["factorize"]["runs"] == {
        "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1, "expired": 1,
    }  # fmt: skip


@pytest.mark.django_db
def test_every_tier_and_every_registered_agent_has_a_block_even_without_runs():
    stats = run_stats(runs=Run.objects.all(), window=HOUR)

    assert list(stats["tiers"]) == ["critical", "standard", "batch"]
    assert set(stats["agents"]) == set(Agent.objects.filter(registered=True).values_list("name", flat=True))
    assert stats["agents"]["echo"] == {
        "runs": dict.fromkeys(RunStatus.values, 0),
        "sla_compliance": None,
        "queue_wait_ms": {"p50": None, "p95": None, "p99": None},
        "run_ms": {"p50": None, "p95": None, "p99": None},
        "backlog": 0,
    }


@pytest.mark.django_db
def test_sla_compliance_is_the_percent_of_finished_runs_that_met_their_sla(echo):
    RunFactory.create_batch(39, agent=echo, finished=True, sla_met=True)
    RunFactory(agent=echo, finished=True, status=RunStatus.FAILED, sla_met=False)
    RunFactory.create_batch(5, agent=echo, status=RunStatus.RUNNING)  # not finished: sla_met unknown

    stats = tier_stats(runs=Run.objects.all(), window=HOUR)

    assert stats["standard"]["sla_compliance"] == 97.5


@pytest.mark.django_db
def test_sla_compliance_is_none_when_no_run_has_finished(echo):
    RunFactory(agent=echo, status=RunStatus.QUEUED)

    assert agent_stats(runs=Run.objects.all(), window=HOUR)["echo"]["sla_compliance"] is None


@pytest.mark.django_db
def test_percentiles_of_queue_wait_and_run_time_are_percentile_cont(echo, user):
    for ms in range(1, 101):
        RunFactory(agent=echo, submitted_by=user, finished=True, run_ms=ms, queue_wait_ms=1000 + 10 * ms)

    block = agent_stats(runs=Run.objects.all(), window=HOUR)["echo"]

    assert block["run_ms"] == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert block["queue_wait_ms"] == {"p50": 1505.0, "p95": 1950.5, "p99": 1990.1}


@pytest.mark.django_db
def test_percentiles_leave_out_runs_that_have_not_finished(echo):
    RunFactory(agent=echo, finished=True, run_ms=40, queue_wait_ms=4)
    RunFactory(agent=echo, status=RunStatus.RUNNING, started_at=timezone.now(), queue_wait_ms=9999)

    block = tier_stats(runs=Run.objects.all(), window=HOUR)["standard"]

    assert block["queue_wait_ms"] == {"p50": 4.0, "p95": 4.0, "p99": 4.0}
    assert block["run_ms"] == {"p50": 40.0, "p95": 40.0, "p99": 40.0}


@pytest.mark.django_db
def test_runs_submitted_before_the_window_are_left_out(echo):
    now = timezone.now()
    RunFactory(agent=echo, finished=True, run_ms=10, submitted_at=now - timedelta(minutes=59))
    RunFactory(agent=echo, finished=True, run_ms=5000, sla_met=False, submitted_at=now - timedelta(minutes=61))
    RunFactory(agent=echo, status=RunStatus.FAILED, submitted_at=now - timedelta(days=2))

    block = agent_stats(runs=Run.objects.all(), window=HOUR, now=now)["echo"]

    assert block["runs"]["succeeded"] == 1
    assert block["runs"]["failed"] == 0
    assert block["sla_compliance"] == 100.0
    assert block["run_ms"]["p99"] == 10.0


@pytest.mark.django_db
def test_backlog_counts_the_runs_queued_now_whenever_they_were_submitted(echo, factorize):
    now = timezone.now()
    RunFactory.create_batch(2, agent=echo, status=RunStatus.QUEUED)
    RunFactory(agent=echo, status=RunStatus.QUEUED, submitted_at=now - timedelta(days=3))
    RunFactory(agent=echo, status=RunStatus.RUNNING)
    RunFactory(agent=factorize, status=RunStatus.QUEUED)

    stats = run_stats(runs=Run.objects.all(), window=HOUR, now=now)

    assert stats["agents"]["echo"]["backlog"] == 3
    assert stats["agents"]["echo"]["runs"]["queued"] == 2  # in the window
    assert stats["tiers"]["standard"]["backlog"] == 3
    assert stats["tiers"]["batch"]["backlog"] == 1
    assert stats["tiers"]["critical"]["backlog"] == 0


@pytest.mark.django_db
def test_stats_cover_only_the_runs_given(echo, user):
    RunFactory(agent=echo, submitted_by=user, finished=True)
    RunFactory.create_batch(2, agent=echo, status=RunStatus.FAILED)

    stats = run_stats(runs=Run.objects.filter(submitted_by=user), window=HOUR)

    assert stats["agents"]["echo"]["runs"]["succeeded"] == 1
    assert stats["agents"]["echo"]["runs"]["failed"] == 0


@pytest.mark.django_db
def test_stats_take_one_grouped_query_per_grouping_however_many_agents(django_assert_num_queries):
    for agent in Agent.objects.all():
        RunFactory.create_batch(2, agent=agent, finished=True)

    # Runs grouped by tier, runs grouped by agent, and the names of the registered agents.
    with django_assert_num_queries(3):
        run_stats(runs=Run.objects.all(), window=HOUR)


@pytest.mark.django_db
def test_the_python_fallback_gives_the_same_figures_as_the_database(monkeypatch, echo, factorize):
    rng = random.Random(3)
    now = timezone.now()
    for agent in (echo, factorize):
        for _ in range(60):
            RunFactory(
                agent=agent,
                finished=True,
                run_ms=rng.randrange(1, 10_000),
                queue_wait_ms=rng.randrange(0, 500),
                sla_met=rng.random() < 0.9,
                submitted_at=now - timedelta(minutes=rng.randrange(0, 120)),
            )
    RunFactory(agent=echo, status=RunStatus.QUEUED)

    in_database = run_stats(runs=Run.objects.all(), window=HOUR, now=now)
    monkeypatch.setattr(stats_module, "_percentiles_in_database", lambda db: False)
    in_python = run_stats(runs=Run.objects.all(), window=HOUR, now=now)

    assert in_python == in_database
    assert in_database["agents"]["echo"]["run_ms"]["p95"] is not None


@pytest.mark.django_db
def test_the_agent_changelist_shows_recent_sla_compliance_and_p95_run_time(client, echo, factorize):
    client.force_login(StaffFactory())
    for ms in range(1, 101):
        RunFactory(agent=echo, finished=True, run_ms=ms, sla_met=ms <= 75)
    RunFactory(agent=echo, finished=True, run_ms=99999, sla_met=False, submitted_at=timezone.now() - 2 * HOUR)

    response = client.get(reverse("admin:agents_agent_changelist"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "SLA % (1h)" in html
    assert "P95 run ms (1h)" in html  # the admin capitalizes column headers
    shown = {agent.name: agent.recent_stats for agent in response.context["cl"].result_list}
    assert shown["echo"]["sla_compliance"] == 75.0
    assert shown["echo"]["run_ms"]["p95"] == 95.05
    assert shown["factorize"]["sla_compliance"] is None
    assert '<td class="field-sla_compliance_recent">75.0</td>' in html
    assert '<td class="field-p95_run_ms_recent">95.05</td>' in html


@pytest.mark.django_db
def test_the_agent_changelist_queries_do_not_grow_with_the_agents_on_the_page(
    client, django_assert_max_num_queries, echo
):
    client.force_login(StaffFactory())
    RunFactory(agent=echo, finished=True)
    client.get(reverse("admin:agents_agent_changelist"))  # warm the session and content types
    with django_assert_max_num_queries(12) as few:
        client.get(reverse("admin:agents_agent_changelist"))
    baseline = len(few.captured_queries)

    for index in range(15):
        Agent.objects.create(
            name=f"extra.{index}", version="1", sla_seconds=60, soft_time_limit=10, time_limit=15, registered=False
        )

    with django_assert_max_num_queries(baseline):
        client.get(reverse("admin:agents_agent_changelist"))
