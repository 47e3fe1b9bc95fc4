"""A lone run's message goes while the run is inserted; the claim still decides who runs, and a worker that gets
the message before the row waits for it."""

import json
import logging
import threading
import time
import uuid
from base64 import b64decode

import pytest
from django.conf import settings
from django.db import OperationalError, connection, transaction

from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus
from agents.runs import submit
from agents.runs.dispatch import dispatched_key
from agents.runs.execute import runs_execute
from agents.runs.submit import RunRequest, run_submit
from scheduling.backlog import backlog_key, tier_field
from tests.factories import RunFactory


def queued_run_ids(queue: str = "standard") -> list[str]:
    """The run ids of the messages waiting in a tier's queue, oldest first."""
    raw = redis_client().lrange(settings.REDIS_KEY_PREFIX + queue, 0, -1)
    return [run_id for message in reversed(raw) for run_id in json.loads(b64decode(json.loads(message)["body"]))[0]]


@pytest.fixture(autouse=True)
def nothing_queued() -> None:
    """No message, marker or backlog count left by an earlier test (they outlive a test's database)."""
    redis_client().delete(settings.REDIS_KEY_PREFIX + "standard", dispatched_key(), backlog_key())


@pytest.fixture
def seen_at_insert(monkeypatch) -> list[dict]:
    """Each time runs were inserted: whether each was already marked as having a message on its way (marker and
    message go to Redis together; a worker may have taken the message already, never the marker: it removes
    that only once it has found the row), and whether it was stored yet."""
    seen: list[dict] = []
    insert = submit.runs_insert

    def observed(runs):
        marked = redis_client().zmscore(dispatched_key(), [str(run.pk) for run in runs])
        stored = set(Run.objects.filter(pk__in=[run.pk for run in runs]).values_list("pk", flat=True))
        seen.extend(
            {"marked": score is not None, "stored": run.pk in stored} for run, score in zip(runs, marked, strict=True)
        )
        insert(runs)

    monkeypatch.setattr(submit, "runs_insert", observed)
    return seen


@pytest.mark.usefixtures("transactional_db")
def test_a_lone_run_s_message_is_sent_before_the_run_is_inserted(user, seen_at_insert, published):
    run, _ = run_submit(user=user, request=RunRequest(agent="echo", input={"n": 1}))

    assert seen_at_insert == [{"marked": True, "stored": False}]
    assert published == [[str(run.pk)]]
    assert Run.objects.filter(pk=run.pk).exists()


@pytest.mark.usefixtures("transactional_db")
def test_a_run_submitted_inside_a_transaction_is_sent_only_after_commit(user, seen_at_insert, published):
    with transaction.atomic():
        run, _ = run_submit(user=user, request=RunRequest(agent="echo", input={"n": 2}))
        assert published == []

    assert seen_at_insert == [{"marked": False, "stored": False}]
    assert published == [[str(run.pk)]]


@pytest.mark.usefixtures("transactional_db")
def test_a_run_with_an_idempotency_key_is_sent_only_after_its_insert(user, seen_at_insert, published):
    run, _ = run_submit(user=user, request=RunRequest(agent="echo", input={"n": 3}, idempotency_key="k-1"))

    assert seen_at_insert == [{"marked": False, "stored": False}]
    assert published == [[str(run.pk)]]


@pytest.mark.usefixtures("transactional_db")
def test_with_messages_ahead_turned_off_a_lone_run_is_sent_after_its_insert(user, settings, seen_at_insert, published):
    settings.RUN_MESSAGE_AHEAD = False

    run, _ = run_submit(user=user, request=RunRequest(agent="echo", input={"n": 4}))

    assert seen_at_insert == [{"marked": False, "stored": False}]
    assert published == [[str(run.pk)]]


@pytest.mark.usefixtures("transactional_db")
def test_the_message_of_a_run_whose_insert_fails_is_withdrawn(user, monkeypatch):
    def database_gone(runs):
        raise OperationalError("the database went away")

    monkeypatch.setattr(submit, "runs_insert", database_gone)

    with pytest.raises(OperationalError):
        run_submit(user=user, request=RunRequest(agent="echo", input={"n": 5}))

    assert queued_run_ids() == []
    assert redis_client().zcard(dispatched_key()) == 0
    assert int(redis_client().hget(backlog_key(), tier_field("standard")) or 0) == 0
    assert not Run.objects.exists()


@pytest.mark.usefixtures("transactional_db")
def test_a_message_that_comes_before_its_run_is_stored_runs_the_run_once_it_is(user):
    run = RunFactory.build(submitted_by=user)

    def store_later() -> None:
        time.sleep(0.2)
        run.save(force_insert=True)
        connection.close()

    storing = threading.Thread(target=store_later)
    storing.start()
    runs_execute(run_ids=[str(run.pk)], worker="worker@test")
    storing.join()

    stored = Run.objects.get(pk=run.pk)
    assert (stored.status, stored.attempts, stored.worker) == (RunStatus.SUCCEEDED, 1, "worker@test")


@pytest.mark.usefixtures("transactional_db")
def test_a_message_for_a_run_never_stored_is_dropped_after_the_wait(settings, caplog):
    settings.RUN_MESSAGE_AHEAD_WAIT_SECONDS = 0.2
    run_id = str(uuid.uuid4())
    redis_client().zadd(dispatched_key(), {run_id: time.time()})

    with caplog.at_level(logging.WARNING, logger="agents.runs.execute"):
        runs_execute(run_ids=[run_id], worker="worker@test")

    assert f"dropping a message for run {run_id}, which was not stored in time" in caplog.text
    assert redis_client().zscore(dispatched_key(), run_id) is None
    assert not Run.objects.exists()


@pytest.mark.usefixtures("transactional_db")
def test_a_second_delivery_of_a_finished_lone_run_does_not_run_it_again(settings):
    settings.RUN_MESSAGE_AHEAD_WAIT_SECONDS = 30
    run = RunFactory(finished=True, attempts=1)

    runs_execute(run_ids=[str(run.pk)], worker="worker@test")

    stored = Run.objects.get(pk=run.pk)
    assert (stored.status, stored.attempts) == (RunStatus.SUCCEEDED, 1)
