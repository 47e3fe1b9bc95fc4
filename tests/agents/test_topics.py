"""Agents coordinate over topics: the dispatcher submits one run per message for each reacting agent."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunStatus
from agents.registry import RegistryError, agent, registry
from agents.topics import topic_dispatcher_serve, topic_message_dispatch, topic_stats, topic_stats_key
from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory
from tests.polling import eventually

TOPIC = "test.orders"


@pytest.fixture(autouse=True)
def _counters_start_at_zero():
    redis_client().delete(topic_stats_key())


def envelope(message, *, run=None, **fields) -> str:
    body = events.topic_envelope(TOPIC, message, run_id=run.pk if run else None)
    return json.dumps({**body, **fields})


def dispatch(data: str | bytes):
    return topic_message_dispatch(TOPIC, data, agents=["test.listener"])


def test_agents_declare_the_topics_they_react_to():
    assert registry.reacting_to()[TOPIC] == ["test.listener"]


@pytest.mark.parametrize("topics", [["Bad Topic"], ["a" * 101], "test.orders", [""]])
def test_an_invalid_topic_name_fails_the_declaration(topics):
    class Input(BaseModel):
        pass

    with pytest.raises(RegistryError, match="topic"):
        agent(name="test.bad-topics", input=Input, topics=topics)


def test_publishing_on_an_invalid_topic_name_is_refused():
    with pytest.raises(events.InvalidTopic):
        events.publish_topic("No Spaces!", {"x": 1})


@pytest.mark.django_db(transaction=True)
def test_a_message_becomes_a_run_of_the_reacting_agent_as_a_child_of_the_publisher():
    publisher = RunFactory()

    outcome = dispatch(envelope({"order_id": 7}, run=publisher))

    run = Run.objects.get(agent__name="test.listener")
    assert (run.input, run.parent_id, run.submitted_by_id) == ({"order_id": 7}, publisher.pk, publisher.submitted_by_id)
    assert run.status == RunStatus.QUEUED
    assert outcome == {"received": 1, "submitted": 1}


@pytest.mark.django_db(transaction=True)
def test_the_same_message_delivered_twice_makes_one_run():
    data = envelope({"order_id": 8})

    dispatch(data)
    second = dispatch(data)

    assert Run.objects.filter(agent__name="test.listener").count() == 1
    assert second["duplicate"] == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "data",
    [
        b"\xff not json",
        "[1, 2]",
        json.dumps({"message": {"order_id": 1}}),
        envelope(["not", "an", "object"]),
        envelope({"order_id": "seven"}),
        envelope({"order_id": 1}, topic="other.topic"),
    ],
    ids=["not-json", "not-an-object", "no-id", "message-not-object", "input-invalid", "wrong-topic"],
)
def test_a_bad_message_is_counted_and_makes_no_run(data):
    outcome = dispatch(data)

    assert outcome["bad"] == 1
    assert not Run.objects.filter(agent__name="test.listener").exists()
    assert topic_stats()[TOPIC]["bad"] == 1


@pytest.mark.django_db(transaction=True)
def test_a_disabled_agent_gets_no_runs_from_its_topic():
    Agent.objects.filter(name="test.listener").update(enabled=False)

    outcome = dispatch(envelope({"order_id": 9}))

    assert outcome["submitted"] == 0
    assert not Run.objects.filter(agent__name="test.listener").exists()


def test_a_dispatcher_with_no_topic_to_serve_idles_and_stops_cleanly(monkeypatch):
    monkeypatch.setattr(registry, "reacting_to", dict)
    stop, subscribed, failures = threading.Event(), threading.Event(), []

    def serve() -> None:
        try:
            topic_dispatcher_serve(stop, subscribed=subscribed)
        except Exception as exc:
            failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    assert subscribed.wait(5)
    stop.set()
    server.join(5)

    assert not server.is_alive()
    assert failures == []


@pytest.fixture
def dispatcher(tmp_path):
    """The Procfile's dispatcher process, for this test run's database and Redis prefix."""
    log = tmp_path / "dispatcher.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "dispatch_topics"], cwd=ROOT, env=worker_env(), stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    channel = events.topic_channel(TOPIC)
    deadline = time.monotonic() + 30
    while redis_client().pubsub_numsub(channel)[0][1] < 1:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"dispatcher did not subscribe:\n{Path(log).read_text()[-3000:]}")
        time.sleep(0.1)
    yield process
    process.terminate()
    assert process.wait(timeout=20) == 0


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("workers")
def test_an_agent_publishing_on_a_topic_starts_a_run_of_the_agent_that_reacts(api, dispatcher):
    publisher = api.post("/api/v1/runs/", {"agent": "test.publisher", "input": {"order_id": 5}}, format="json").json()

    child = eventually(
        lambda: Run.objects.filter(agent__name="test.listener", parent_id=publisher["id"], status="succeeded").first(),
        seconds=30,
        what="the reacting agent's run",
    )

    assert child.result == {"order": 5}
    assert child.submitted_by == api.user
    assert Run.objects.get(pk=publisher["id"]).result == {"subscribers": 1}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_bad_message_does_not_stop_the_dispatcher(dispatcher):
    redis_client().publish(events.topic_channel(TOPIC), b"\x00 garbage")
    events.publish_topic(TOPIC, {"order_id": 11})

    run = eventually(lambda: Run.objects.filter(agent__name="test.listener").first(), seconds=30, what="a run")

    assert run.input == {"order_id": 11}
    assert dispatcher.poll() is None
    # The dispatcher counts a message once its run is stored, so the count may trail the run by a moment.
    expected = {"received": 2, "bad": 1, "submitted": 1}
    eventually(lambda: topic_stats()[TOPIC] == expected, seconds=10, what=f"the topic's counts reaching {expected}")
