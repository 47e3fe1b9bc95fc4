"""A message's time slice: runs not started when it is spent go back to the queue for other processes."""

import uuid

import pytest
from django.db import connection

from agents.models import Agent, Run, RunStatus
from agents.runs.execute import runs_execute
from tests.agents.test_recovery import counter
from tests.factories import RunFactory


@pytest.fixture
def spent_slice(settings):
    # Spent as soon as the message's first run is done.
    settings.RUN_MESSAGE_SLICE_SECONDS = 0


def statuses(runs: list[Run]) -> list[tuple[str, int]]:
    return [(run.status, run.attempts) for run in Run.objects.filter(pk__in=[run.pk for run in runs]).order_by("pk")]


@pytest.mark.usefixtures("transactional_db", "spent_slice")
def test_the_runs_a_spent_slice_did_not_start_are_queued_again_without_an_attempt(published):
    first, *rest = [RunFactory(input={"n": n}) for n in range(3)]

    runs_execute(run_ids=[str(first.pk)] + [str(run.pk) for run in rest], worker="w1")

    assert Run.objects.get(pk=first.pk).status == RunStatus.SUCCEEDED
    assert statuses(rest) == [(RunStatus.QUEUED, 0)] * 2
    assert sorted(run_id for message in published for run_id in message) == sorted(str(run.pk) for run in rest)


@pytest.mark.usefixtures("transactional_db", "spent_slice")
def test_runs_handed_back_while_the_database_connection_is_lost_are_queued_once_it_answers(published):
    key = uuid.uuid4().hex
    # Its agent has the database end this process's connection: handing the rest back meets a dead connection.
    first = RunFactory(agent=Agent.objects.get(name="test.connection_lost"), input={"key": key})
    rest = [RunFactory(input={"n": n}) for n in range(2)]

    runs_execute(run_ids=[str(first.pk)] + [str(run.pk) for run in rest], worker="w1")

    connection.close()
    assert (Run.objects.get(pk=first.pk).status, counter("count", key)) == (RunStatus.SUCCEEDED, 1)
    assert statuses(rest) == [(RunStatus.QUEUED, 0)] * 2
