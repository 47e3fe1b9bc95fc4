"""Agents coordinate over durable topics: each message becomes one run of each reacting agent, however
the dispatchers come and go."""

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone
from psycopg import sql
from pydantic import BaseModel

from agentplatform import events
from agentplatform.events import TOPIC_GROUP
from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunStatus
from agents.registry import RegistryError, agent, registry
from agents.topics import (
    topic_dispatcher_serve,
    topic_message_dispatch,
    topic_pending_claim,
    topic_stats,
    topic_stats_key,
)
from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory
from tests.polling import eventually

TOPIC = "test.orders"
REACTING = ["test.auditor", "test.listener"]
# The machine running the tests is shared: processes may take a while to start and to get through.
PROCESS_SECONDS = 90


@pytest.fixture(autouse=True)
def _topic_starts_empty():
    redis_client().delete(topic_stats_key(), stream())


def stream() -> str:
    return events.topic_stream(TOPIC)


def envelope(message, *, run=None, **fields) -> str:
    body = events.topic_envelope(TOPIC, message, run_id=run.pk if run else None)
    return json.dumps({**body, **fields})


def dispatch(data: str | bytes | None):
    return topic_message_dispatch(TOPIC, data, agents=["test.listener"])


def publish(order_id: int, *, run: Run | None = None) -> str:
    return events.publish_topic(
        TOPIC, {"order_id": order_id}, run_id=run.pk if run else None, user=run.submitted_by_id if run else None
    )


def delivered(consumer: str = "test") -> tuple[bytes, bytes]:
    """Read the next message of the topic as a dispatcher of the group would: (entry id, envelope)."""
    [[_, [(entry_id, fields)]]] = redis_client().xreadgroup(TOPIC_GROUP, consumer, {stream(): ">"}, count=1)
    return entry_id, fields[b"envelope"]


def pending() -> int:
    """Messages of the topic delivered to a dispatcher and not acknowledged."""
    return redis_client().xpending(stream(), TOPIC_GROUP)["pending"]


def all_acknowledged() -> bool:
    """Every message of the topic was delivered and acknowledged."""
    client = redis_client()
    [group] = client.xinfo_groups(stream())
    [[last_id, _]] = client.xrevrange(stream(), count=1)
    return group["last-delivered-id"] == last_id and group["pending"] == 0


def runs_per_message() -> Counter:
    """How many runs each reacting agent has for each order."""
    return Counter(
        (name, data["order_id"]) for name, data in Run.objects.filter(agent__name__in=REACTING).values_list(
            "agent__name", "input")
    )  # fmt: skip


@contextlib.contextmanager
def agent_row_locked(name: str) -> Iterator[None]:
    """Hold the agent's row locked from another connection: a run of it cannot be inserted meanwhile."""
    db = django_settings.DATABASES["default"]
    with psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"]) as locker:
        query = sql.SQL("SELECT 1 FROM {} WHERE name = %s FOR UPDATE").format(sql.Identifier(Agent._meta.db_table))
        locker.execute(query, [name])
        try:
            yield
        finally:
            locker.rollback()


def blocked_on_a_lock() -> bool:
    """Whether a connection to this test run's database waits for a lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def test_agents_declare_the_topics_they_react_to():
    assert registry.reacting_to()[TOPIC] == REACTING


@pytest.mark.parametrize("topics", [["Bad Topic"], ["a" * 101], "test.orders", [""]])
def test_an_invalid_topic_name_fails_the_declaration(topics):
    class Input(BaseModel):
        pass

    with pytest.raises(RegistryError, match="topic"):
        agent(name="test.bad-topics", input=Input, topics=topics)


def test_publishing_on_an_invalid_topic_name_is_refused():
    with pytest.raises(events.InvalidTopic):
        events.publish_topic("No Spaces!", {"x": 1})


def test_a_message_published_before_any_dispatcher_read_the_topic_waits_for_the_dispatchers():
    message_id = publish(1)

    _, data = delivered()

    assert json.loads(data)["id"] == message_id


@pytest.mark.django_db(transaction=True)
def test_a_message_becomes_a_run_of_the_reacting_agent_as_a_child_of_the_publisher():
    publisher = RunFactory()

    outcome = dispatch(envelope({"order_id": 7}, run=publisher))

    run = Run.objects.get(agent__name="test.listener")
    assert (run.input, run.parent_id, run.submitted_by_id) == ({"order_id": 7}, publisher.pk, publisher.submitted_by_id)
    assert run.status == RunStatus.QUEUED
    assert outcome == {"received": 1, "submitted": 1}


@pytest.mark.django_db(transaction=True)
def test_the_run_a_message_starts_is_keyed_by_the_message_and_the_agent():
    message_id = publish(7, run=RunFactory())
    _, data = delivered()

    dispatch(data)

    assert Run.objects.get(agent__name="test.listener").idempotency_key == f"topic:{message_id}:test.listener"


@pytest.mark.django_db(transaction=True)
def test_a_run_reacting_to_a_message_keeps_its_own_tier_and_deadline_not_its_publishers():
    publisher = RunFactory(tier="batch", deadline=timezone.now() + timedelta(seconds=1))
    publish(9, run=publisher)
    _, data = delivered()

    dispatch(data)

    reaction = Run.objects.get(agent__name="test.listener")
    assert reaction.parent_id == publisher.pk
    assert reaction.tier == reaction.agent.tier
    assert reaction.deadline > publisher.deadline


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("origin", ["a run", "nobody"])
def test_the_same_message_delivered_twice_makes_one_run(origin):
    data = envelope({"order_id": 8}, run=RunFactory() if origin == "a run" else None)

    first = dispatch(data)
    second = dispatch(data)

    assert Run.objects.filter(agent__name="test.listener").count() == 1
    assert (first["submitted"], second["submitted"], second["duplicate"]) == (1, 0, 1)


@pytest.mark.django_db(transaction=True)
def test_a_message_is_acknowledged_once_its_runs_are_stored():
    publish(9, run=RunFactory())
    entry_id, data = delivered()

    topic_message_dispatch(TOPIC, data, agents=REACTING, entry_id=entry_id)

    assert runs_per_message() == {("test.auditor", 9): 1, ("test.listener", 9): 1}
    assert pending() == 0


@pytest.mark.django_db(transaction=True)
def test_a_message_whose_run_could_not_be_stored_stays_unacknowledged():
    publish(10, run=RunFactory())
    entry_id, data = delivered()

    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '200ms'")
    try:
        with agent_row_locked("test.listener"):
            outcome = topic_message_dispatch(TOPIC, data, agents=REACTING, entry_id=entry_id)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")

    assert (outcome["submitted"], outcome["failed"]) == (1, 1)
    assert runs_per_message() == {("test.auditor", 10): 1}
    assert pending() == 1


@pytest.mark.django_db(transaction=True)
def test_a_message_delivered_again_after_a_failure_starts_only_the_runs_it_lacked():
    publish(11, run=RunFactory())
    entry_id, data = delivered()
    topic_message_dispatch(TOPIC, data, agents=["test.auditor"], entry_id=None)

    outcome = topic_message_dispatch(TOPIC, data, agents=REACTING, entry_id=entry_id)

    assert (outcome["submitted"], outcome["duplicate"]) == (1, 1)
    assert runs_per_message() == {("test.auditor", 11): 1, ("test.listener", 11): 1}
    assert pending() == 0


@pytest.mark.django_db(transaction=True)
def test_a_message_left_unacknowledged_past_the_idle_time_is_claimed_and_dispatched(settings):
    settings.TOPIC_CLAIM_IDLE_SECONDS = 0.1
    publish(12, run=RunFactory())
    delivered(consumer="stopped")
    time.sleep(0.2)

    claimed = topic_pending_claim(TOPIC, agents=REACTING, consumer="alive")

    assert claimed == 1
    assert runs_per_message() == {("test.auditor", 12): 1, ("test.listener", 12): 1}
    assert pending() == 0


@pytest.mark.django_db(transaction=True)
def test_a_message_held_less_than_the_idle_time_is_left_to_its_dispatcher(settings):
    settings.TOPIC_CLAIM_IDLE_SECONDS = 60
    publish(13, run=RunFactory())
    delivered(consumer="busy")

    claimed = topic_pending_claim(TOPIC, agents=REACTING, consumer="alive")

    assert claimed == 0
    assert not runs_per_message()
    assert pending() == 1


def test_dispatchers_that_stopped_holding_nothing_leave_the_group(settings):
    settings.TOPIC_CLAIM_IDLE_SECONDS = 0.1
    publish(14)
    entry_id, _ = delivered(consumer="stopped")
    redis_client().xack(stream(), TOPIC_GROUP, entry_id)
    time.sleep(0.2)

    topic_pending_claim(TOPIC, agents=REACTING, consumer="alive")

    assert "stopped" not in {
        consumer["name"].decode() for consumer in redis_client().xinfo_consumers(stream(), TOPIC_GROUP)
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "data",
    [
        b"\xff not json",
        "[1, 2]",
        json.dumps({"message": {"order_id": 1}}),
        envelope({"order_id": 1}, id="x" * 65),
        envelope(["not", "an", "object"]),
        envelope({"order_id": "seven"}),
        envelope({"order_id": 1}, topic="other.topic"),
        None,
    ],
    ids=["not-json", "not-an-object", "no-id", "id-too-long", "message-not-object", "input-invalid", "wrong-topic",
         "no-envelope"],
)  # fmt: skip
def test_a_bad_message_is_counted_and_makes_no_run(data):
    outcome = dispatch(data)

    assert outcome["bad"] == 1
    assert not Run.objects.filter(agent__name="test.listener").exists()
    assert topic_stats()[TOPIC]["bad"] == 1


@pytest.mark.django_db(transaction=True)
def test_a_bad_message_is_acknowledged():
    redis_client().xgroup_create(stream(), TOPIC_GROUP, id="0", mkstream=True)
    redis_client().xadd(stream(), {"envelope": b"\x00 garbage"})
    entry_id, data = delivered()

    topic_message_dispatch(TOPIC, data, agents=REACTING, entry_id=entry_id)

    assert pending() == 0


@pytest.mark.django_db(transaction=True)
def test_a_disabled_agent_gets_no_runs_from_its_topic():
    Agent.objects.filter(name="test.listener").update(enabled=False)

    outcome = dispatch(envelope({"order_id": 9}))

    assert outcome["submitted"] == 0
    assert not Run.objects.filter(agent__name="test.listener").exists()


def test_the_topic_stream_keeps_about_its_maximum_length(settings):
    settings.TOPIC_STREAM_MAXLEN = 50
    for order_id in range(500):
        publish(order_id)

    # Trimming is approximate: whole nodes of entries (100 by default) go at once, so up to a node more stays.
    assert 50 <= redis_client().xlen(stream()) <= 150
    [[_, newest]] = redis_client().xrevrange(stream(), count=1)
    assert json.loads(newest[b"envelope"])["message"] == {"order_id": 499}


def test_the_topic_stream_drops_messages_older_than_its_maximum_age(settings):
    settings.TOPIC_STREAM_MAX_AGE_SECONDS = 3600
    client = redis_client()
    for n in range(1000):
        client.xadd(stream(), {"envelope": "{}"}, id=f"1000-{n + 1}")

    publish(1)

    # Approximate trimming again: of entries past the age, at most one node's worth stays.
    an_hour_ago = int((time.time() - 3600) * 1000)
    assert len(client.xrange(stream(), max=f"{an_hour_ago}-0")) <= 100
    assert client.xlen(stream()) <= 101


def test_a_dispatcher_with_no_topic_to_serve_idles_and_stops_cleanly(monkeypatch):
    monkeypatch.setattr(registry, "reacting_to", dict)
    stop, ready, failures = threading.Event(), threading.Event(), []

    def serve() -> None:
        try:
            topic_dispatcher_serve(stop, ready=ready)
        except Exception as exc:
            failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    assert ready.wait(5)
    stop.set()
    server.join(5)

    assert not server.is_alive()
    assert failures == []


@pytest.fixture
def start_dispatcher(tmp_path):
    """Start the Procfile's dispatcher process for this test run's database and Redis prefix (with
    settings from `env`) and wait until it serves the topics; stopped at the end unless killed before."""
    started: list[subprocess.Popen] = []

    def start(**env: str) -> subprocess.Popen:
        log = tmp_path / f"dispatcher-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "manage.py", "dispatch_topics"], cwd=ROOT, env={**worker_env(), **env}, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append(process)
        deadline = time.monotonic() + PROCESS_SECONDS
        while "dispatching topics" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the dispatcher did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        return process

    yield start
    running = [process for process in started if process.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        assert process.wait(timeout=30) == 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_messages_published_while_no_dispatcher_runs_start_their_runs_once_one_starts(start_dispatcher):
    publisher = RunFactory()
    for order_id in range(5):
        publish(order_id, run=publisher)

    start_dispatcher()

    eventually(all_acknowledged, seconds=PROCESS_SECONDS, what="every message acknowledged")
    assert runs_per_message() == {(name, order_id): 1 for name in REACTING for order_id in range(5)}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_messages_a_killed_dispatcher_held_are_claimed_by_another_without_duplicates(start_dispatcher):
    publisher = RunFactory()
    for order_id in range(3):
        publish(order_id, run=publisher)
    with agent_row_locked("test.listener"):
        first = start_dispatcher()
        # It stores the auditor's run of the first message, then the listener's, whose commit waits for
        # the lock (PostgreSQL checks a run's agent when it commits): it has read the three messages
        # and acknowledged none.
        eventually(blocked_on_a_lock, seconds=PROCESS_SECONDS, what="the dispatcher waiting on the lock")
        assert pending() == 3
        first.kill()
        first.wait(timeout=30)
    # Released, the lock lets the killed dispatcher's last commit through: the first message has both
    # runs stored and is still unacknowledged, the others have none.
    audited = Run.objects.get(agent__name="test.auditor")

    start_dispatcher(TOPIC_CLAIM_IDLE_SECONDS="1", TOPIC_CLAIM_INTERVAL_SECONDS="0.5")

    eventually(all_acknowledged, seconds=PROCESS_SECONDS, what="every message acknowledged")
    assert runs_per_message() == {(name, order_id): 1 for name in REACTING for order_id in range(3)}
    assert Run.objects.get(agent__name="test.auditor", input={"order_id": 0}).pk == audited.pk
    assert topic_stats()[TOPIC]["duplicate"] == 2


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("workers")
def test_an_agent_publishing_on_a_topic_starts_a_run_of_the_agent_that_reacts(api, start_dispatcher):
    start_dispatcher()
    publisher = api.post("/api/v1/runs/", {"agent": "test.publisher", "input": {"order_id": 5}}, format="json").json()

    child = eventually(
        lambda: Run.objects.filter(agent__name="test.listener", parent_id=publisher["id"], status="succeeded").first(),
        seconds=PROCESS_SECONDS,
        what="the reacting agent's run",
    )

    assert child.result == {"order": 5}
    assert child.submitted_by == api.user
    message_id = Run.objects.get(pk=publisher["id"]).result["message"]
    assert child.idempotency_key == f"topic:{message_id}:test.listener"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_bad_message_does_not_stop_the_dispatcher(start_dispatcher):
    dispatcher = start_dispatcher()
    redis_client().xadd(stream(), {"envelope": b"\x00 garbage"})
    publish(11)

    eventually(all_acknowledged, seconds=PROCESS_SECONDS, what="every message acknowledged")

    assert runs_per_message() == {("test.auditor", 11): 1, ("test.listener", 11): 1}
    assert dispatcher.poll() is None
    assert topic_stats()[TOPIC] == {"received": 2, "bad": 1, "submitted": 2}
