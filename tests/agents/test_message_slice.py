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


def handed_back(runs: list[Run], published: list[list]) -> bool:
    """Whether `runs` were given up by the worker "w1" and sent again (another test's live worker may run them)."""
    kept = Run.objects.filter(pk__in=[run.pk for run in runs], worker="w1").exists()
    sent = sorted(run_id for message in published for run_id in message)
    return not kept and sent == sorted(str(run.pk) for run in runs)


@pytest.mark.usefixtures("transactional_db", "spent_slice")
def test_the_runs_a_spent_slice_did_not_start_are_handed_back(published):
    first, *rest = [RunFactory(input={"n": n}) for n in range(3)]

    runs_execute(run_ids=[str(first.pk)] + [str(run.pk) for run in rest], worker="w1")

    assert Run.objects.get(pk=first.pk).status == RunStatus.SUCCEEDED
    assert handed_back(rest, published)


@pytest.mark.usefixtures("transactional_db", "spent_slice")
def test_runs_are_handed_back_once_the_database_answers_when_the_connection_was_lost(published):
    key = uuid.uuid4().hex
    # Its agent has the database end this process's connection: handing the rest back meets a dead connection.
    first = RunFactory(agent=Agent.objects.get(name="test.connection_lost"), input={"key": key})
    rest = [RunFactory(input={"n": n}) for n in range(2)]

    runs_execute(run_ids=[str(first.pk)] + [str(run.pk) for run in rest], worker="w1")

    connection.close()
    assert (Run.objects.get(pk=first.pk).status, counter("count", key)) == (RunStatus.SUCCEEDED, 1)
    assert handed_back(rest, published)
