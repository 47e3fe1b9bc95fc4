"""A claimed run's lease: renewed by its worker's heartbeat while the run is held, lapsing when it is not."""

import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from agents.models import Run, RunStatus
from agents.runs.execute import runs_claim
from agents.runs.lease import Heartbeat, board
from agents.runs.recovery import sweep
from tests.agents.test_execution import submit, wait, wait_for_status
from tests.agents.test_recovery import counter
from tests.factories import RunFactory


@pytest.mark.django_db
def test_a_claim_lasts_one_lease_whatever_the_time_limit():
    run = RunFactory(time_limit=3600)

    (claimed,) = runs_claim(run_ids=[run.pk], worker="w1")

    assert claimed.lease_expires_at - claimed.started_at <= timedelta(seconds=settings.RUN_LEASE_SECONDS + 1)


@pytest.mark.django_db
def test_the_heartbeat_renews_the_leases_of_runs_this_worker_holds():
    (claimed,) = runs_claim(run_ids=[RunFactory().pk], worker="w1")
    board.hold([claimed.pk])
    try:
        time.sleep(0.01)
        renewed = Heartbeat(worker="w1").beat()
    finally:
        board.hold(())

    assert renewed == 1
    assert Run.objects.get(pk=claimed.pk).lease_expires_at > claimed.lease_expires_at


@pytest.mark.django_db
def test_the_heartbeat_leaves_runs_no_process_holds_to_lapse():
    (claimed,) = runs_claim(run_ids=[RunFactory().pk], worker="w1")
    board.hold([claimed.pk])
    board.hold(())

    assert Heartbeat(worker="w1").beat() == 0
    assert Run.objects.get(pk=claimed.pk).lease_expires_at == claimed.lease_expires_at


@pytest.mark.django_db
def test_the_heartbeat_renews_only_its_own_workers_claims():
    (claimed,) = runs_claim(run_ids=[RunFactory().pk], worker="w1")
    board.hold([claimed.pk])
    try:
        renewed = Heartbeat(worker="w2").beat()
    finally:
        board.hold(())

    assert renewed == 0


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_run_longer_than_its_lease_is_never_taken_from_its_live_worker(api):
    seconds = settings.RUN_LEASE_SECONDS * 2
    run = submit(api, "sleep", {"seconds": seconds}, tier="batch")
    wait_for_status(run["id"], RunStatus.RUNNING)

    deadline = time.monotonic() + seconds + 1
    while time.monotonic() < deadline and not Run.objects.get(pk=run["id"]).is_terminal:
        sweep()
        time.sleep(0.5)
    finished = wait(api, run["id"], seconds=10)

    assert finished["status"] == "succeeded"
    assert finished["attempts"] == 1
    assert Run.objects.get(pk=run["id"]).lost_attempts == 0
    assert timezone.now() > Run.objects.get(pk=run["id"]).started_at + timedelta(seconds=settings.RUN_LEASE_SECONDS)


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_run_whose_outcome_meets_a_lost_database_connection_is_recorded_without_running_again(api):
    key = uuid.uuid4().hex
    run = submit(api, "test.connection_lost", {"key": key})

    finished = wait(api, run["id"])

    assert finished["status"] == "succeeded"
    assert finished["attempts"] == 1
    assert counter("count", key) == 1
