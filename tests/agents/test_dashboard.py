"""The admin's dashboard: a staff page with vendored charts, the JSON it polls, and the workers online."""

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.staticfiles import finders
from django.urls import reverse
from django.utils import timezone

from agentplatform.redis_client import redis_client
from agents.dashboard import DASHBOARD_WINDOWS, dashboard_snapshot
from agents.models import Agent, Run, RunStatus
from agents.retention import retention_last_purge_key, runs_purge
from agents.stats import admission_refusals_key, admission_refusals_record
from caching.memoize import memo_stats_key
from scheduling.tiers import Tier
from tests.factories import RunFactory, UserFactory
from tests.sample_agents import memo_square

PAGE = reverse("admin:agents_dashboard")
DATA = reverse("admin:agents_dashboard_data")
WORKERS = reverse("admin:agents_dashboard_workers")


@pytest.fixture
def refusals_counted_from_empty() -> None:
    hour = int(timezone.now().timestamp()) // 3600
    redis_client().delete(*(admission_refusals_key(hour - back) for back in range(26)))


@pytest.fixture
def viewer(client, db):
    """A staff user who may view runs, and nothing more."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(user)
    return client


@pytest.mark.parametrize("url", [PAGE, DATA, WORKERS])
def test_the_dashboard_sends_anyone_not_logged_in_to_the_admin_login(client, db, url):
    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("url", [PAGE, DATA, WORKERS])
def test_the_dashboard_is_for_staff_only(client, db, url):
    client.force_login(UserFactory())

    assert client.get(url).status_code == 302


@pytest.mark.parametrize("url", [PAGE, DATA])
def test_staff_without_the_right_to_view_runs_are_refused(client, db, url):
    client.force_login(UserFactory(is_staff=True))

    assert client.get(url).status_code == 403


def test_the_admin_home_page_links_to_the_dashboard(staff_client):
    html = staff_client.get(reverse("admin:index")).content.decode()

    assert f'href="{PAGE}"' in html


def test_the_runs_list_links_to_the_dashboard(staff_client):
    assert f'href="{PAGE}"' in staff_client.get(reverse("admin:agents_run_changelist")).content.decode()


def test_the_page_loads_chart_js_from_this_deployment_not_a_cdn(viewer):
    response = viewer.get(PAGE)

    html = response.content.decode()
    assert response.status_code == 200
    script = f'src="{settings.STATIC_URL}agents/vendor/chart.js/chart.umd.min.js"'
    assert script in html
    assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', html), "nothing is loaded from elsewhere"
    vendored = Path(finders.find("agents/vendor/chart.js/chart.umd.min.js"))
    assert vendored.read_text().startswith("/*!\n * Chart.js v4")
    assert (vendored.parent / "LICENSE.md").exists()


def test_the_page_offers_each_window_and_draws_a_canvas_per_chart(viewer):
    html = viewer.get(PAGE, {"window": "24h"}).content.decode()

    for window in DASHBOARD_WINDOWS:
        assert f'data-window="{window}"' in html
    assert 'class="dashboard-window selected" data-window="24h"' in html
    assert html.count("<canvas ") == 7


def test_the_data_has_each_tiers_figures_now_and_over_the_window(viewer):
    earlier = timezone.now() - timedelta(seconds=5)
    RunFactory.create_batch(3, finished=True, run_ms=40, queue_wait_ms=5, submitted_at=earlier)
    RunFactory.create_batch(2, status=RunStatus.QUEUED)
    RunFactory(status=RunStatus.RUNNING)

    body = viewer.get(DATA, {"window": "15m"}).json()

    assert (body["window"], body["window_seconds"], body["bucket_seconds"], body["poll_seconds"]) == ("15m", 900, 60, 5)
    assert list(body["tiers"]) == ["critical", "standard", "batch"]
    standard = body["tiers"]["standard"]
    assert (standard["backlog"], standard["running_now"], standard["executed"]) == (2, 1, 6)
    assert standard["run_ms"] == {"p50": 40.0, "p95": 40.0, "p99": 40.0}
    assert standard["finished_per_minute"] == 0.2
    assert standard["sla_compliance"] == 100.0
    assert len(body["series"]["starts"]) == 16
    series = body["series"]["tiers"]["standard"]
    assert sum(series["executed"]) == 3
    # One bucket holds the runs: the last, or the one before when the minute turned in the last 5 s.
    assert [value for value in series["run_ms"]["p95"] if value is not None] == [40.0]
    assert len(series["admission_refusals"]) == 16


@pytest.mark.usefixtures("refusals_counted_from_empty")
def test_the_data_counts_admission_refusals_per_tier(viewer):
    admission_refusals_record({"batch": 5, "critical": 1})

    body = viewer.get(DATA, {"window": "1h"}).json()

    assert body["tiers"]["batch"]["admission_refusals"] == 5
    assert body["tiers"]["critical"]["admission_refusals"] == 1
    assert body["series"]["tiers"]["batch"]["admission_refusals"][-1] == 5


def test_the_data_gives_the_result_cache_hit_rate_and_the_coalesced_runs(viewer):
    leader = RunFactory(finished=True)
    RunFactory.create_batch(2, status=RunStatus.SUCCEEDED, cached=True, finished_at=timezone.now())
    RunFactory(status=RunStatus.SUCCEEDED, follows=leader, finished_at=timezone.now())

    cache = viewer.get(DATA).json()["cache"]

    assert (cache["executed"], cache["cached"], cache["coalesced"]) == (1, 2, 1)
    assert cache["hit_rate"] == 50.0


def test_the_data_gives_the_time_memoized_functions_saved(viewer):
    redis_client().delete(memo_stats_key(memo_square.name))
    memo_square.clear()
    memo_square("dashboard", 3)
    memo_square.local_clear()
    memo_square("dashboard", 3)  # a hit in Redis, counted with the next flush or computation
    memo_square("dashboard", 4)
    saved = memo_square.stats().saved_ms

    memo = viewer.get(DATA).json()["cache"]["memo"]

    assert memo["functions"] >= 1
    assert memo["saved_ms"] == pytest.approx(saved, abs=0.01)
    assert memo["hits"] >= 1


@pytest.mark.usefixtures("db")
def test_the_data_shows_the_retention_and_the_last_purge(viewer, settings):
    settings.RUN_RETENTION_DAYS = 14
    redis_client().delete(retention_last_purge_key())
    RunFactory(finished=True, submitted_at=timezone.now() - timedelta(days=20))
    runs_purge()

    retention = viewer.get(DATA).json()["retention"]

    assert retention["days"] == 14
    assert retention["last_purge"]["deleted"] == 1


@pytest.mark.parametrize("window", ["", "5m", "2h", "7d", "1H", "soon"])
def test_a_window_the_dashboard_does_not_offer_answers_400_naming_the_field(viewer, window):
    response = viewer.get(DATA, {"window": window})

    assert response.status_code == 400
    assert response.json() == {"window": ["Choose one of 15m, 1h, 24h."]}


def test_without_redis_the_data_still_answers_with_the_database_figures(viewer, settings):
    RunFactory(finished=True)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there

    body = viewer.get(DATA).json()

    assert body["redis_answers"] is False
    assert body["tiers"]["standard"]["executed"] == 1
    assert body["cache"]["memo"] is None
    assert body["retention"]["last_purge"] is None


@pytest.mark.django_db
def test_one_snapshot_reads_the_database_in_a_few_queries_whatever_the_runs(django_assert_max_num_queries):
    for agent in Agent.objects.filter(name__in=["echo", "factorize", "sleep"]):
        RunFactory.create_batch(5, agent=agent, tier=Tier.BATCH, finished=True)

    # tier figures, the series, the memoized functions' names
    with django_assert_max_num_queries(3):
        dashboard_snapshot(window="24h")


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db")
def test_the_workers_online_are_listed_by_tier_with_their_pool_sizes(workers, housekeeping_worker, client):
    client.force_login(UserFactory(is_staff=True, is_superuser=True))

    response = client.get(WORKERS)

    assert response.status_code == 200
    queues = response.json()["queues"]
    pools = {queue: [worker["pool"] for worker in found] for queue, found in queues.items() if found}
    assert pools == {"critical": [1], "standard": [2], "batch": [1], "housekeeping": [2]}
    assert all(worker["name"].startswith(f"{Tier.STANDARD.queue}-") for worker in queues["standard"])
    assert Run.objects.count() == 0


def test_a_days_figures_come_in_half_hours_and_are_asked_for_less_often(viewer):
    body = viewer.get(DATA, {"window": "24h"}).json()

    assert (body["window_seconds"], body["bucket_seconds"], body["poll_seconds"]) == (86400, 1800, 30)
    assert len(body["series"]["starts"]) == 49
