"""Submitting a run and waiting for its end in one request: `POST /api/v1/runs/?wait=N`."""

import threading
import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.models import Run, RunStatus
from agents.runs.execute import runs_claim
from agents.runs.finish import Attempt, attempts_record, held_by
from tests.polling import eventually

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = "/api/v1/runs/"


def finished_as_a_worker_would(result: dict, *, after: float = 0.0) -> threading.Thread:
    """Once a run exists, claim it and record `result` for it in another thread, as a worker does.

    The workers of other tests may be running and take the run first: `result` is what `echo` returns."""

    def finish() -> None:
        run = eventually(lambda: Run.objects.first(), what="a run")
        time.sleep(after)
        for claimed in runs_claim(run_ids=[run.pk], worker="w1"):
            now = timezone.now()
            attempt = Attempt(run=claimed, started_at=now, finished_at=now, run_ms=1, result=result)
            attempts_record([attempt], held=held_by(claimed))
        connection.close()

    thread = threading.Thread(target=finish, daemon=True)
    thread.start()
    return thread


def test_a_submission_with_wait_answers_with_the_run_once_it_has_finished(api):
    finishing = finished_as_a_worker_would({"n": 1}, after=0.2)

    response = api.post(f"{RUNS}?wait=10", {"agent": "echo", "input": {"n": 1}}, format="json")
    finishing.join()

    assert response.status_code == 201
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"n": 1}
    assert Run.objects.get(pk=response.json()["id"]).status == RunStatus.SUCCEEDED


def test_a_submission_with_wait_reads_its_run_only_once_it_has_ended(api, settings):
    # As deployed: a token and an agent's tuning are read once a second at most (tests read them every time).
    settings.API_TOKEN_CACHE_SECONDS = settings.AGENT_TUNING_CACHE_SECONDS = 60
    api.post(RUNS, {"agent": "echo", "input": {}}, format="json")
    Run.objects.all().delete()
    finishing = finished_as_a_worker_would({"n": 1}, after=0.3)

    with CaptureQueriesContext(connection) as queries:
        response = api.post(f"{RUNS}?wait=10", {"agent": "echo", "input": {"n": 1}}, format="json")
    finishing.join()

    assert response.json()["status"] == "succeeded"
    # the insert, then the one read once the run's end was heard of: listening began before the run existed
    assert [query["sql"].split()[0] for query in queries] == ["INSERT", "SELECT"], queries


def test_a_submission_with_wait_answers_with_the_run_as_it_stands_when_the_wait_is_over(api):
    started = time.monotonic()

    response = api.post(f"{RUNS}?wait=0.5", {"agent": "sleep", "input": {"seconds": 2}}, format="json")

    assert response.status_code == 201
    # queued, or running if another test's worker took it
    assert response.json()["status"] in {"queued", "running"}
    assert time.monotonic() - started >= 0.5


def test_a_repeated_idempotency_key_with_wait_answers_with_the_first_run_once_it_has_finished(api):
    body = {"agent": "echo", "input": {"n": 1}, "idempotency_key": "once"}
    first = api.post(RUNS, body, format="json").json()
    finishing = finished_as_a_worker_would({"n": 1}, after=0.2)

    response = api.post(f"{RUNS}?wait=10", body, format="json")
    finishing.join()

    assert response.status_code == 200
    assert response.json()["id"] == first["id"]
    assert response.json()["status"] == "succeeded"
    assert Run.objects.count() == 1


@pytest.mark.parametrize("wait", ["31", "-1", "soon"])
def test_a_submission_with_a_wait_outside_0_to_30_seconds_answers_400_and_stores_nothing(api, wait):
    response = api.post(f"{RUNS}?wait={wait}", {"agent": "echo", "input": {}}, format="json")

    assert response.status_code == 400
    assert "wait" in response.json()
    assert not Run.objects.exists()


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_a_submission_with_wait_answers_with_what_a_worker_computed(api):
    response = api.post(f"{RUNS}?wait=20", {"agent": "echo", "input": {"n": 7}}, format="json")

    assert response.status_code == 201
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"n": 7}
