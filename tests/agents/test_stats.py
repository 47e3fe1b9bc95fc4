import random
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from agentplatform.redis_client import redis_client
from agents import stats as stats_module
from agents.models import Agent, Run, RunStatus
from agents.stats import (
    admission_refusals,
    admission_refusals_key,
    admission_refusals_record,
    agent_stats,
    bucket_starts,
    parse_window,
    percentile_cont,
    run_stats,
    tier_series,
    tier_stats,
)
from scheduling.tiers import Tier
from tests.factories import RunFactory, StaffFactory

HOUR = timedelta(hours=1)


@pytest.fixture
def echo(db) -> Agent:
    return Agent.objects.get(name="echo")


@pytest.fixture
def factorize(db) -> Agent:
    return Agent.objects.get(name="factorize")


def counts(**by_status: int) -> dict[str, int]:
    """Runs by status as the stats give them: every status, 0 unless given."""
    return dict.fromkeys(RunStatus.values, 0) | by_status


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

    assert stats["tiers"]["standard"]["runs"] == counts(queued=2, running=1, succeeded=3)
    assert stats["tiers"]["critical"]["runs"] == counts(failed=1)
    assert stats["tiers"]["batch"]["runs"] == counts(cancelled=1, expired=1)
    assert stats["agents"]["echo"]["runs"] == counts(queued=2, running=1, succeeded=3, failed=1)
    assert stats["agents"]["factorize"]["runs"] == counts(cancelled=1, expired=1)


@pytest.mark.django_db
def test_every_tier_and_every_registered_agent_has_a_block_even_without_runs():
    stats = run_stats(runs=Run.objects.all(), window=HOUR)

    assert list(stats["tiers"]) == ["critical", "standard", "batch"]
    assert set(stats["agents"]) == set(Agent.objects.filter(registered=True).values_list("name", flat=True))
    assert stats["agents"]["echo"] == {
        "runs": dict.fromkeys(RunStatus.values, 0),
        "executed": 0,
        "cached": 0,
        "coalesced": 0,
        "sla_compliance": None,
        "queue_wait_ms": {"p50": None, "p95": None, "p99": None},
        "run_ms": {"p50": None, "p95": None, "p99": None},
        "finished_per_minute": 0.0,
        "backlog": 0,
        "running_now": 0,
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


@pytest.mark.django_db
def test_cached_and_coalesced_runs_are_counted_apart_from_executed_ones(echo):
    now = timezone.now()
    leader = RunFactory(agent=echo, finished=True)
    RunFactory.create_batch(2, agent=echo, finished=True)
    RunFactory.create_batch(3, agent=echo, status=RunStatus.SUCCEEDED, cached=True, sla_met=True, finished_at=now)
    RunFactory(agent=echo, status=RunStatus.SUCCEEDED, follows=leader, sla_met=True, finished_at=now)

    block = agent_stats(runs=Run.objects.all(), window=HOUR)["echo"]

    assert (block["executed"], block["cached"], block["coalesced"]) == (3, 3, 1)
    assert block["runs"]["succeeded"] == 7


@pytest.mark.django_db
def test_sla_compliance_is_over_executed_runs_only(echo):
    now = timezone.now()
    leader = RunFactory(agent=echo, finished=True, sla_met=True)
    RunFactory(agent=echo, finished=True, status=RunStatus.FAILED, sla_met=False)
    RunFactory.create_batch(8, agent=echo, status=RunStatus.SUCCEEDED, cached=True, sla_met=True, finished_at=now)
    RunFactory(agent=echo, status=RunStatus.SUCCEEDED, follows=leader, sla_met=True, finished_at=now)

    assert tier_stats(runs=Run.objects.all(), window=HOUR)["standard"]["sla_compliance"] == 50.0


@pytest.mark.django_db
def test_latency_percentiles_leave_out_runs_that_shared_another_runs_work(echo):
    leader = RunFactory(agent=echo, finished=True, run_ms=100, queue_wait_ms=20)
    # With zero timings, as a run that never started would read if its timings were filled in.
    RunFactory.create_batch(5, agent=echo, finished=True, cached=True, run_ms=0, queue_wait_ms=0)
    RunFactory.create_batch(5, agent=echo, finished=True, follows=leader, run_ms=0, queue_wait_ms=0)

    block = agent_stats(runs=Run.objects.all(), window=HOUR)["echo"]

    assert block["run_ms"] == {"p50": 100.0, "p95": 100.0, "p99": 100.0}
    assert block["queue_wait_ms"] == {"p50": 20.0, "p95": 20.0, "p99": 20.0}


@pytest.mark.django_db
def test_throughput_is_the_runs_finished_within_the_window_per_minute(echo):
    now = timezone.now()
    RunFactory.create_batch(29, agent=echo, finished=True)
    # Submitted before the window, finished within it: it counts.
    RunFactory(
        agent=echo,
        finished=True,
        submitted_at=now - 2 * HOUR,
        started_at=now - timedelta(minutes=10),
        finished_at=now - timedelta(minutes=5),
    )
    # Finished before the window: it does not.
    RunFactory(agent=echo, finished=True, submitted_at=now - 3 * HOUR)

    block = tier_stats(runs=Run.objects.all(), window=timedelta(minutes=15), now=now)["standard"]

    assert block["finished_per_minute"] == 2.0


@pytest.mark.django_db
def test_running_now_counts_the_runs_running_whenever_they_were_submitted(echo):
    RunFactory.create_batch(2, agent=echo, status=RunStatus.RUNNING)
    RunFactory(agent=echo, status=RunStatus.RUNNING, submitted_at=timezone.now() - timedelta(days=3))

    block = tier_stats(runs=Run.objects.all(), window=HOUR)["standard"]

    assert block["running_now"] == 3
    assert block["runs"]["running"] == 2


# A fixed clock, half a minute into a minute: the buckets' edges are known.
NOON = datetime(2026, 1, 5, 12, 0, 30, tzinfo=UTC)


def finished_at(at: datetime, **fields) -> Run:
    """A run that finished at `at`, having started 100 ms before (run_ms 100, queue wait 10 ms)."""
    fields.setdefault("agent", Agent.objects.get(name="echo"))
    started = at - timedelta(milliseconds=100)
    return RunFactory(
        finished=True, submitted_at=started - timedelta(milliseconds=10), started_at=started, finished_at=at, **fields
    )


@pytest.mark.django_db
def test_the_series_counts_the_runs_finished_in_each_bucket_per_tier(factorize):
    for _ in range(3):
        finished_at(NOON - timedelta(minutes=4, seconds=50))
    finished_at(NOON - timedelta(minutes=1, seconds=31), agent=factorize)
    finished_at(NOON - timedelta(seconds=20))
    finished_at(NOON - timedelta(seconds=10))
    finished_at(NOON - timedelta(minutes=20))  # before the window

    series = tier_series(runs=Run.objects.all(), window=timedelta(minutes=10), bucket_seconds=60, now=NOON)

    assert series["starts"][0] == datetime(2026, 1, 5, 11, 50, tzinfo=UTC)
    assert series["starts"][-1] == datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    standard = series["tiers"]["standard"]["finished_per_minute"]
    assert len(standard) == 11
    assert standard[5] == 3.0
    # The last minute has lasted 30 s so far: two runs in it finish at four a minute.
    assert standard[10] == 4.0
    assert sum(standard) == 7.0
    assert series["tiers"]["batch"]["finished_per_minute"][8] == 1.0
    assert series["tiers"]["critical"]["finished_per_minute"] == [0.0] * 11


@pytest.mark.django_db
def test_the_series_gives_latency_and_sla_of_executed_runs_and_counts_the_shared_ones_per_bucket():
    at = NOON - timedelta(minutes=8)
    leader = finished_at(at, run_ms=10, sla_met=True)
    finished_at(at, run_ms=20, sla_met=True)
    finished_at(at, run_ms=30, sla_met=False)
    finished_at(at, cached=True, run_ms=0, sla_met=True)
    finished_at(at, follows=leader, run_ms=0, sla_met=True)

    series = tier_series(runs=Run.objects.all(), window=timedelta(minutes=10), bucket_seconds=60, now=NOON)

    standard = series["tiers"]["standard"]
    assert (standard["executed"][2], standard["cached"][2], standard["coalesced"][2]) == (3, 1, 1)
    assert standard["run_ms"]["p50"][2] == 20.0
    assert standard["sla_compliance"][2] == 66.67
    assert standard["run_ms"]["p50"][3] is None
    assert standard["sla_compliance"][3] is None


@pytest.mark.django_db
def test_the_series_python_fallback_gives_the_same_figures_as_the_database(monkeypatch, echo, factorize):
    rng = random.Random(5)
    for agent in (echo, factorize):
        for _ in range(80):
            finished_at(
                NOON - timedelta(seconds=rng.randrange(0, 7200)),
                agent=agent,
                run_ms=rng.randrange(1, 10_000),
                sla_met=rng.random() < 0.9,
            )

    in_database = tier_series(runs=Run.objects.all(), window=HOUR, bucket_seconds=300, now=NOON)
    monkeypatch.setattr(stats_module, "_percentiles_in_database", lambda db: False)
    in_python = tier_series(runs=Run.objects.all(), window=HOUR, bucket_seconds=300, now=NOON)

    assert in_python == in_database
    assert any(value is not None for value in in_database["tiers"]["batch"]["run_ms"]["p95"])


@pytest.fixture
def refusals_counted_from_empty() -> None:
    """This run's refusal counters of the past two hours (other tests' refusals included) removed."""
    hour = int(timezone.now().timestamp()) // 3600
    redis_client().delete(admission_refusals_key(hour), admission_refusals_key(hour - 1))


def test_admission_refusals_are_counted_per_tier_in_each_bucket():
    now = datetime(2026, 1, 6, 12, 0, 30, tzinfo=UTC)
    admission_refusals_record({"batch": 3}, at=now - timedelta(minutes=5, seconds=20))  # 11:55:10
    admission_refusals_record({"batch": 1, "critical": 2}, at=now - timedelta(minutes=4, seconds=40))  # 11:55:50
    admission_refusals_record({"standard": 4}, at=now - timedelta(minutes=30))  # before the window

    starts = bucket_starts(window=timedelta(minutes=10), bucket_seconds=60, now=now)
    refusals = admission_refusals(starts=starts, bucket_seconds=60, now=now)

    assert refusals["batch"][5] == 4
    assert refusals["critical"][5] == 2
    assert sum(refusals["batch"]) == 4
    assert refusals["standard"] == [0] * 11


def test_admission_refusals_of_a_longer_bucket_add_up_its_minutes():
    now = datetime(2026, 1, 7, 12, 10, tzinfo=UTC)
    for minutes in (1, 15, 29):
        admission_refusals_record({"standard": 1}, at=datetime(2026, 1, 7, 11, minutes, tzinfo=UTC))
    admission_refusals_record({"standard": 5}, at=datetime(2026, 1, 7, 11, 45, tzinfo=UTC))

    starts = bucket_starts(window=timedelta(hours=2), bucket_seconds=1800, now=now)
    refusals = admission_refusals(starts=starts, bucket_seconds=1800, now=now)

    assert starts[2] == datetime(2026, 1, 7, 11, 0, tzinfo=UTC)
    assert refusals["standard"][2:4] == [3, 5]


@pytest.mark.usefixtures("refusals_counted_from_empty")
def test_a_submission_refused_admission_is_counted_as_refused(api, settings):
    settings.TIER_BACKLOG_LIMITS = {**settings.TIER_BACKLOG_LIMITS, "standard": 1}
    assert api.post("/api/v1/runs/", {"agent": "echo", "input": {"n": 1}}, format="json").status_code == 201

    refused = api.post(
        "/api/v1/runs/batch/", {"runs": [{"agent": "echo", "input": {"n": n}} for n in (2, 3)]}, format="json"
    )

    assert refused.status_code == 429
    now = timezone.now()
    starts = bucket_starts(window=timedelta(minutes=2), bucket_seconds=60, now=now)
    assert sum(admission_refusals(starts=starts, bucket_seconds=60, now=now)["standard"]) == 2
