"""With Redis unreachable, runs are still accepted and waited on, and dispatched once it is back."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connection
from django.utils import timezone

from agentplatform.celery import app
from agents.models import Run, RunStatus
from agents.runs.recovery import sweep
from tests.factories import RunFactory


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def unreachable_redis(settings) -> Iterator[None]:
    """Within the block, this process's Redis clients and Celery broker point at a loopback port nobody listens on."""
    url, redis_url, broker_url = f"redis://127.0.0.1:{closed_port()}/0", settings.REDIS_URL, app.conf.broker_url
    settings.REDIS_URL = app.conf.broker_url = url
    _broker_connections_reset()
    try:
        yield
    finally:
        settings.REDIS_URL = redis_url
        app.conf.broker_url = broker_url
        _broker_connections_reset()


def _broker_connections_reset() -> None:
    """Celery takes its next broker connection from the pool of the current broker URL."""
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def redis_unreachable(settings) -> Iterator[None]:
    with unreachable_redis(settings):
        yield


def submit(api, agent: str = "echo", input: dict | None = None) -> dict:
    response = api.post("/api/v1/runs/", {"agent": agent, "input": input or {"text": "hi"}}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.django_db
@pytest.mark.usefixtures("redis_unreachable")
def test_a_run_submitted_while_redis_is_down_is_stored_queued(api):
    run = submit(api)

    assert Run.objects.get(pk=run["id"]).status == RunStatus.QUEUED


@pytest.mark.django_db
@pytest.mark.usefixtures("redis_unreachable")
def test_a_batch_submitted_while_redis_is_down_is_stored_queued(api):
    body = {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(5)]}

    response = api.post("/api/v1/runs/batch/", body, format="json")

    assert response.status_code == 201, response.content
    assert Run.objects.filter(status=RunStatus.QUEUED).count() == 5


@pytest.mark.usefixtures("transactional_db", "redis_unreachable")
def test_waiting_on_a_run_while_redis_is_down_reads_the_database(api):
    run = RunFactory(submitted_by=api.user)

    def finish() -> None:
        Run.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED, result={}, finished_at=timezone.now())
        connection.close()

    began = time.monotonic()
    threading.Timer(0.5, finish).start()
    response = api.get(f"/api/v1/runs/{run.pk}/", {"wait": 10})

    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert time.monotonic() - began < 10


@pytest.mark.usefixtures("transactional_db", "redis_unreachable")
def test_submitting_and_waiting_while_redis_is_down_reads_the_database(api):
    def finish() -> None:
        Run.objects.filter(status=RunStatus.QUEUED).update(
            status=RunStatus.SUCCEEDED, result={"n": 1}, finished_at=timezone.now()
        )
        connection.close()

    began = time.monotonic()
    threading.Timer(0.5, finish).start()
    response = api.post("/api/v1/runs/?wait=10", {"agent": "echo", "input": {"n": 1}}, format="json")

    assert response.status_code == 201
    assert (response.json()["status"], response.json()["result"]) == ("succeeded", {"n": 1})
    assert time.monotonic() - began < 10


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_runs_accepted_while_redis_was_down_are_dispatched_once_it_is_back(api, settings):
    settings.SWEEP_QUEUED_AFTER_SECONDS = 0
    with unreachable_redis(settings):
        ids = [submit(api, "echo", {"n": n})["id"] for n in range(3)]

    sweep()

    finished = [api.get(f"/api/v1/runs/{run_id}/", {"wait": 20}).json() for run_id in ids]
    assert [run["status"] for run in finished] == ["succeeded"] * 3
