"""A submission reads its agents' tuning from the process's copy, which a change made here clears at once
and a change made elsewhere reaches within AGENT_TUNING_CACHE_SECONDS."""

import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.errors import RunRejected
from agents.models import Agent
from agents.runs.submit import RunRequest, run_submit
from agents.tuning import agent_tuning_forget


@pytest.fixture
def tuning_kept(settings):
    settings.AGENT_TUNING_CACHE_SECONDS = 60
    agent_tuning_forget()
    yield
    agent_tuning_forget()


def submit(user, agent: str = "echo"):
    run, _ = run_submit(user=user, request=RunRequest(agent=agent, input={"n": 1}, tier="standard"))
    return run


def agent_reads(queries: CaptureQueriesContext) -> list[str]:
    return [
        query["sql"] for query in queries.captured_queries if Agent._meta.db_table in query["sql"].split("WHERE")[0]
    ]


def test_a_second_submission_reads_no_agent_row(tuning_kept, user):
    submit(user)

    with CaptureQueriesContext(connection) as queries:
        submit(user)

    assert agent_reads(queries) == []


def test_without_the_copy_every_submission_reads_its_agent(settings, user):
    settings.AGENT_TUNING_CACHE_SECONDS = 0
    submit(user)

    with CaptureQueriesContext(connection) as queries:
        submit(user)

    assert len(agent_reads(queries)) == 1


def test_a_bulk_update_in_this_process_applies_to_the_next_submission(tuning_kept, user):
    submit(user)

    Agent.objects.filter(name="echo").update(enabled=False)

    with pytest.raises(RunRejected) as refused:
        submit(user)
    assert refused.value.errors == {"agent": ["Agent 'echo' is disabled."]}


def test_a_saved_change_applies_to_the_next_submission(tuning_kept, user):
    submit(user)
    echo = Agent.objects.get(name="echo")
    echo.sla_seconds = 7
    echo.save()

    assert submit(user).sla_seconds == 7


def test_a_change_made_by_another_process_applies_once_the_copy_is_older_than_its_time(settings, user):
    settings.AGENT_TUNING_CACHE_SECONDS = 0.3
    agent_tuning_forget()
    submit(user)
    # Another process's change: a statement this process's models never hear of.
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {Agent._meta.db_table} SET sla_seconds = 9 WHERE name = 'echo'")

    assert submit(user).sla_seconds != 9
    time.sleep(0.35)
    assert submit(user).sla_seconds == 9
    agent_tuning_forget()
