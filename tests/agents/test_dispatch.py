"""Run messages: published after commit, carrying the run id only, on the tier's queue, sent again only
when they are gone."""

import json
import uuid
from base64 import b64decode
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import redis
from celery.signals import after_task_publish, before_task_publish
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from agentplatform.celery import app
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus
from agents.runs.dispatch import EXECUTE_RUN_TASK, dispatched_key, message_publish, run_dispatch
from agents.runs.execute import runs_execute
from agents.runs.recovery import sweep
from agents.runs.submit import RunRequest, run_submit, run_submit_many
from tests.factories import RunFactory


@pytest.fixture
def published():
    """Messages published while the test runs, with whether a transaction was open at that moment."""
    messages = []

    def record(sender, body, routing_key, headers, **kwargs):
        messages.append(
            {"args": body[0], "kwargs": body[1], "queue": routing_key, "in_transaction": connection.in_atomic_block}
        )

    before_task_publish.connect(record, weak=False)
    yield messages
    before_task_publish.disconnect(record)


def test_the_message_is_published_only_after_the_transaction_commits(transactional_db, user, published):
    with transaction.atomic():
        run, _ = run_submit(user=user, request=RunRequest(agent="echo", input={"x": 1}))
        assert published == []

    assert published == [{"args": [str(run.pk)], "kwargs": {}, "queue": "standard", "in_transaction": False}]


def test_a_rolled_back_submission_publishes_nothing(transactional_db, user, published):
    def submit_then_fail() -> None:
        with transaction.atomic():
            run_submit(user=user, request=RunRequest(agent="echo", input={}))
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        submit_then_fail()

    assert published == []
    assert not Run.objects.exists()


def test_the_message_goes_to_the_queue_of_the_run_tier(transactional_db, user, published):
    run_submit(user=user, request=RunRequest(agent="echo", input={}, tier="critical"))
    run_submit(user=user, request=RunRequest(agent="factorize", input={"n": 15}))

    assert [message["queue"] for message in published] == ["critical", "batch"]


def test_a_batch_travels_in_one_message_published_after_its_one_commit(transactional_db, user, published):
    runs = run_submit_many(user=user, requests=[RunRequest(agent="echo", input={"n": n}) for n in range(3)])

    assert [message["args"] for message in published] == [[str(run.pk) for run, _ in runs]]


def test_a_large_batch_is_cut_into_messages_of_even_size(transactional_db, user, published, settings):
    settings.RUN_MESSAGE_MAX_RUNS = 4
    runs = run_submit_many(user=user, requests=[RunRequest(agent="echo", input={"n": n}) for n in range(10)])

    assert [len(message["args"]) for message in published] == [4, 3, 3]
    assert [run_id for message in published for run_id in message["args"]] == [str(run.pk) for run, _ in runs]


def test_runs_of_each_tier_travel_on_their_own_queue(transactional_db, user, published):
    requests = [RunRequest(agent="echo", input={"n": n}, tier=tier) for n, tier in enumerate(["critical", "batch"] * 2)]

    runs = run_submit_many(user=user, requests=requests)

    by_queue = {message["queue"]: message["args"] for message in published}
    assert by_queue == {
        "critical": [str(runs[0][0].pk), str(runs[2][0].pk)],
        "batch": [str(runs[1][0].pk), str(runs[3][0].pk)],
    }


def test_a_run_claimed_while_the_sweeper_reads_its_marker_is_not_sent_again(
    transactional_db, published, settings, monkeypatch
):
    settings.SWEEP_QUEUED_AFTER_SECONDS = 0
    run = RunFactory(submitted_at=timezone.now() - timedelta(minutes=1))
    run_dispatch([run], countdown=60)  # a live message, not due for a while
    published.clear()
    command = redis.Redis.execute_command

    def claimed_just_before_the_marker_is_read(self, *args, **options):
        # A worker claims the run, and drops its marker, between the sweeper's reads.
        if args[:2] == ("ZMSCORE", dispatched_key()) and Run.objects.filter(pk=run.pk, status="queued").exists():
            runs_execute(run_ids=[str(run.pk)], worker="elsewhere@host")
        return command(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", claimed_just_before_the_marker_is_read)
    report = sweep()

    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED
    assert report.redispatched == 0
    assert published == []


# No worker consumes this queue: what is published there stays to be read.
UNCONSUMED = "dispatch-test"


def broker_messages(queue: str) -> list[dict]:
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        return [json.loads(raw) for raw in client.lrange(settings.REDIS_KEY_PREFIX + queue, 0, -1)]
    finally:
        client.close()


def comparable(message: dict) -> dict:
    """A broker message without what differs from one publish to the next (ids, tags, the publisher's name)."""
    headers = {k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "origin", "argsrepr", "eta")}
    # A result not ignored is sent as False by Celery 5.6 and as None by 5.7; a worker reads both as False.
    headers["ignore_result"] = bool(headers["ignore_result"])
    properties = {k: v for k, v in message["properties"].items() if k not in ("correlation_id", "delivery_tag")}
    return {**message, "headers": headers, "properties": properties, "body": json.loads(b64decode(message["body"]))}


@pytest.fixture
def unconsumed_queue() -> Iterator[str]:
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(settings.REDIS_KEY_PREFIX + UNCONSUMED)
    yield UNCONSUMED
    client.delete(settings.REDIS_KEY_PREFIX + UNCONSUMED)
    client.close()


def test_a_message_sent_with_its_markers_is_the_message_celery_would_send(unconsumed_queue):
    run_ids = [str(uuid.uuid4()), str(uuid.uuid4())]
    app.send_task(EXECUTE_RUN_TASK, args=run_ids, queue=unconsumed_queue, time_limit=12.5, countdown=30)
    pipe = redis_client().pipeline(transaction=False)
    sent = message_publish(pipe, queue=unconsumed_queue, run_ids=run_ids, time_limit=12.5, countdown=30)
    pipe.execute()
    sent()

    # Pushed on the list's head: the newest first.
    ours, celerys = broker_messages(unconsumed_queue)

    assert comparable(ours) == comparable(celerys)
    assert ours["properties"]["correlation_id"] == ours["headers"]["id"] == ours["headers"]["root_id"]
    assert datetime.fromisoformat(ours["headers"]["eta"]) - datetime.fromisoformat(celerys["headers"]["eta"]) < (
        timedelta(seconds=5)
    )


def test_a_run_is_dispatched_in_the_round_trip_of_its_markers(transactional_db, published, redis_round_trips):
    run = RunFactory(tier="batch")
    redis_round_trips.calls.clear()

    run_dispatch([run])

    assert len(redis_round_trips) == 1, redis_round_trips.calls
    assert [message["args"] for message in published] == [[str(run.pk)]]


def test_with_a_broker_of_its_own_the_message_goes_through_celery(
    transactional_db, settings, published, redis_round_trips
):
    # The same server under another URL: Celery's producer publishes, the markers go to REDIS_URL.
    settings.REDIS_URL = settings.CELERY_BROKER_URL.replace("127.0.0.1", "localhost")
    run = RunFactory(tier="batch")
    redis_round_trips.calls.clear()

    run_dispatch([run])

    assert [message["args"] for message in published] == [[str(run.pk)]]
    # the markers, then Celery's own publish
    assert len(redis_round_trips) >= 2, redis_round_trips.calls


def test_celerys_after_publish_signal_comes_once_the_message_and_its_marker_are_in_redis(transactional_db):
    run = RunFactory(tier="batch")
    seen = []

    def record(sender, body, **kwargs):
        seen.append((body[0], redis_client().zscore(dispatched_key(), str(run.pk)) is not None))

    after_task_publish.connect(record, weak=False)
    try:
        run_dispatch([run])
    finally:
        after_task_publish.disconnect(record)

    assert seen == [([str(run.pk)], True)]
