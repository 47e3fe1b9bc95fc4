"""The cost of a run, pinned: SQL statements and Redis round trips of one submission and one execution.

Every run pays for these; a change that adds a round trip to the hot path fails here. Runs that
travel together pay per message, not per run, so the counts must not grow with a message's size.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunStatus
from agents.runs.execute import runs_execute
from caching.results import result_cache_put
from tests.factories import RunFactory

RUNS = "/api/v1/runs/"


def test_submitting_one_run_through_the_api_costs_three_statements_and_three_redis_round_trips_two_waited_for(
    transactional_db, api, redis_round_trips
):
    api.post(RUNS, {"agent": "echo", "input": {}}, format="json")  # the first request warms per-process caches
    redis_round_trips.calls.clear()

    with CaptureQueriesContext(connection) as queries:
        response = api.post(RUNS, {"agent": "echo", "input": {"n": 1}}, format="json")

    assert response.status_code == 201
    # token, agent, insert: a lone insert needs no transaction around it
    assert len(queries) <= 3, [query["sql"][:60] for query in queries]
    # backlog reservation with the rate; the marker and the message, sent while the run is inserted; the events
    assert redis_round_trips.calls.count("message sent ahead") == 1, redis_round_trips.calls
    assert len(redis_round_trips) <= 3, redis_round_trips.calls


def test_a_cached_answer_through_the_api_costs_one_statement_and_two_redis_round_trips(
    transactional_db, api, settings, redis_round_trips
):
    settings.API_TOKEN_CACHE_SECONDS = settings.AGENT_TUNING_CACHE_SECONDS = 60
    agent = Agent.objects.get(name="factorize")
    result_cache_put(agent="factorize", version=agent.version, input={"n": 8633}, result={"factors": [89, 97]}, ttl=60)
    api.post(RUNS, {"agent": "factorize", "input": {"n": 8633}}, format="json")
    redis_round_trips.calls.clear()

    with CaptureQueriesContext(connection) as queries:
        response = api.post(RUNS, {"agent": "factorize", "input": {"n": 8633}}, format="json")

    assert response.json()["cached"] is True
    # the insert of the answered run
    assert len(queries) == 1, [query["sql"][:60] for query in queries]
    # the cache lookup with the rate; its events
    assert len(redis_round_trips) <= 2, redis_round_trips.calls


def test_with_the_tokens_and_agents_a_process_keeps_a_submission_costs_one_statement(transactional_db, api, settings):
    # As deployed: a token and an agent's tuning are read once a second at most (tests read them every time).
    settings.API_TOKEN_CACHE_SECONDS = settings.AGENT_TUNING_CACHE_SECONDS = 60
    api.post(RUNS, {"agent": "echo", "input": {}}, format="json")

    with CaptureQueriesContext(connection) as queries:
        response = api.post(RUNS, {"agent": "echo", "input": {"n": 1}}, format="json")

    assert response.status_code == 201
    # the insert
    assert len(queries) == 1, [query["sql"][:60] for query in queries]


def test_reading_a_finished_run_with_wait_costs_two_statements(transactional_db, api):
    run = RunFactory(submitted_by=api.user, status=RunStatus.SUCCEEDED, result={"ok": True})

    with CaptureQueriesContext(connection) as queries:
        response = api.get(f"{RUNS}{run.pk}/?wait=5")

    assert response.status_code == 200
    # token, the run with its agent, its children's count by status
    assert len(queries) <= 3, [query["sql"][:60] for query in queries]


def test_a_batch_submission_costs_two_redis_round_trips_whatever_its_size(transactional_db, api, redis_round_trips):
    body = {"runs": [{"agent": "echo", "input": {"n": n}} for n in range(200)]}
    api.post(f"{RUNS}batch/", {"runs": body["runs"][:1]}, format="json")
    redis_round_trips.calls.clear()

    with CaptureQueriesContext(connection) as queries:
        response = api.post(f"{RUNS}batch/", body, format="json")

    assert response.status_code == 201
    assert len([query for query in queries if not query["sql"].startswith(("BEGIN", "COMMIT", "SAVEPOINT"))]) <= 3
    # the reservation with the rate; the events, markers and messages (200 runs travel in two) after commit
    assert len(redis_round_trips) <= 2, redis_round_trips.calls


@pytest.mark.parametrize("runs_in_message", [1, 100])
def test_executing_a_message_costs_two_statements_and_two_redis_round_trips_whatever_its_size(
    transactional_db, redis_round_trips, runs_in_message
):
    runs = [RunFactory(input={"n": n}) for n in range(runs_in_message)]
    redis_round_trips.calls.clear()

    with CaptureQueriesContext(connection) as queries:
        runs_execute(run_ids=[str(run.pk) for run in runs], worker="w1")

    # claim (UPDATE … RETURNING), finish (one bulk UPDATE)
    assert len(queries) <= 2, [query["sql"][:80] for query in queries]
    # markers, backlog and "started" events; "succeeded" events
    assert len(redis_round_trips) <= 2, redis_round_trips.calls
    assert set(Run.objects.values_list("status", flat=True)) == {RunStatus.SUCCEEDED}


def test_a_message_announces_its_runs_in_one_publish_per_shared_channel_and_event(transactional_db):
    runs = [RunFactory(input={"n": n}) for n in range(100)]
    pubsub = redis_client().pubsub()
    pubsub.subscribe(events.agent_channel("echo"), events.all_channel())
    assert [pubsub.get_message(timeout=5)["type"] for _ in range(2)] == ["subscribe", "subscribe"]

    runs_execute(run_ids=[str(run.pk) for run in runs], worker="w1")

    messages = []
    while (message := pubsub.get_message(timeout=1)) is not None:
        messages.append((message["channel"].decode(), events.events_of_message(message["data"])))
    pubsub.close()
    # "started" and "succeeded", each one message on the agent's channel and one on the global channel
    assert sorted((channel, items[0]["event"], len(items)) for channel, items in messages) == sorted(
        (channel, event, 100)
        for channel in (events.agent_channel("echo"), events.all_channel())
        for event in ("started", "succeeded")
    )
