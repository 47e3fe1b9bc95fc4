"""Finished runs are purged once they finished RUN_RETENTION_DAYS ago, a batch at a time; nothing else is."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agentplatform.celery import HOUSEKEEPING_QUEUE, app
from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunSchedule, RunStatus
from agents.retention import PURGE_TASK, retention_last_purge, retention_last_purge_key, runs_purge
from agents.tasks import purge_runs
from tests.factories import RunFactory
from tests.polling import eventually


def finished_days_ago(days: float, **fields) -> Run:
    at = timezone.now() - timedelta(days=days)
    return RunFactory(finished=True, submitted_at=at - timedelta(seconds=1), **fields)


@pytest.fixture
def no_purge_noted(db) -> None:
    redis_client().delete(retention_last_purge_key())


@pytest.mark.django_db
def test_finished_runs_older_than_the_retention_are_deleted_and_newer_ones_kept():
    old = [finished_days_ago(31), finished_days_ago(40, status=RunStatus.FAILED), finished_days_ago(90)]
    recent = [finished_days_ago(29), finished_days_ago(1), RunFactory(finished=True)]

    report = runs_purge(days=30)

    assert report.deleted == 3
    assert report.complete
    assert set(Run.objects.values_list("pk", flat=True)) == {run.pk for run in recent}
    assert not Run.objects.filter(pk__in=[run.pk for run in old]).exists()


@pytest.mark.django_db
def test_runs_still_in_flight_are_kept_however_old():
    long_ago = timezone.now() - timedelta(days=100)
    in_flight = [
        RunFactory(status=RunStatus.QUEUED, submitted_at=long_ago),
        RunFactory(status=RunStatus.RUNNING, submitted_at=long_ago, started_at=long_ago),
    ]

    assert runs_purge(days=30).deleted == 0
    assert Run.objects.filter(pk__in=[run.pk for run in in_flight]).count() == 2


@pytest.mark.django_db
def test_every_kind_of_ending_is_purged():
    for status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.EXPIRED):
        finished_days_ago(60, status=status)

    assert runs_purge(days=30).deleted == 4
    assert not Run.objects.exists()


@pytest.mark.django_db
def test_the_purge_goes_a_batch_at_a_time_until_none_is_left():
    for days in range(31, 38):
        finished_days_ago(days)

    report = runs_purge(days=30, batch=2)

    assert (report.deleted, report.complete) == (7, True)
    assert not Run.objects.exists()


@pytest.mark.django_db
def test_a_pass_out_of_time_stops_after_its_batch_oldest_first_and_the_next_goes_on():
    runs = [finished_days_ago(days) for days in range(31, 36)]

    first = runs_purge(days=30, batch=2, budget_seconds=0)

    assert (first.deleted, first.complete) == (2, False)
    oldest = sorted(runs, key=lambda run: run.finished_at)[:2]
    assert set(Run.objects.values_list("pk", flat=True)) == {run.pk for run in runs} - {run.pk for run in oldest}
    assert runs_purge(days=30, batch=2).deleted == 3


@pytest.mark.django_db
def test_runs_that_pointed_at_a_purged_run_keep_their_rows_with_the_link_emptied(user):
    leader = finished_days_ago(60)
    follower = finished_days_ago(1, follows=leader)
    child = finished_days_ago(1, parent=leader)
    schedule = RunSchedule.objects.create(
        name="nightly", agent=Agent.objects.get(name="echo"), owner=user, interval_seconds=60, last_run=leader
    )

    assert runs_purge(days=30).deleted == 1

    assert Run.objects.get(pk=follower.pk).follows_id is None
    assert Run.objects.get(pk=child.pk).parent_id is None
    schedule.refresh_from_db()
    assert schedule.last_run_id is None


@pytest.mark.django_db
def test_a_retention_of_zero_days_keeps_every_run():
    finished_days_ago(3650)

    report = runs_purge(days=0)

    assert (report.deleted, report.cutoff) == (0, None)
    assert Run.objects.count() == 1


@pytest.mark.usefixtures("no_purge_noted")
def test_the_last_pass_is_noted_for_the_admin():
    finished_days_ago(45)

    report = runs_purge(days=30)

    noted = retention_last_purge()
    assert noted == {
        "at": report.at.isoformat(),
        "deleted": 1,
        "cutoff": report.cutoff.isoformat(),
        "complete": True,
    }


def test_the_purge_runs_periodically_on_the_housekeeping_queue(settings):
    entry = next(entry for entry in app.conf.beat_schedule.values() if entry["task"] == PURGE_TASK)

    assert entry["options"]["queue"] == HOUSEKEEPING_QUEUE
    assert entry["schedule"] == settings.RUN_PURGE_INTERVAL_SECONDS
    assert (purge_runs.name, purge_runs.queue) == (PURGE_TASK, HOUSEKEEPING_QUEUE)


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "no_purge_noted")
def test_the_housekeeping_worker_purges_old_runs(housekeeping_worker):
    old, recent = finished_days_ago(400), finished_days_ago(1)

    purge_runs.delay()

    eventually(lambda: not Run.objects.filter(pk=old.pk).exists(), seconds=30, what="the old run purged")
    assert Run.objects.filter(pk=recent.pk).exists()
    assert eventually(retention_last_purge, seconds=5, what="the purge noted")["deleted"] == 1
