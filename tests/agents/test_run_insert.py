"""New runs are stored field for field as they were built, however many are inserted together."""

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from agents.models import Agent, Run, RunStatus
from agents.runs.submit import PLAIN_INSERT_ROWS_MAX, RunRequest, run_submit_many, runs_insert
from tests.factories import RunFactory


def built(count: int, parent: Run) -> list[Run]:
    """Unsaved runs whose every kind of field holds a value (JSON, UUID, dates, text, numbers, NULL)."""
    echo = Agent.objects.get(name="echo")
    now = timezone.now()
    return [
        Run(
            agent=echo, agent_version="7", tier="batch", input={"n": n, "text": "é\u2603", "nested": [1, {"a": None}]},
            submitted_by=parent.submitted_by, parent=parent, root=parent.pk,
            idempotency_key=f"key-{n}" if n % 2 else None,
            sla_seconds=1.5, soft_time_limit=2.0, time_limit=3.0, max_retries=n % 4, submitted_at=now,
            deadline=now + timedelta(seconds=n + 1), expires_at=None if n % 3 else now + timedelta(hours=1),
            parent_round=2, sibling_index=n, resume={"then": "x", "state": [n]}, attempt_errors=[], log="",
        )
        for n in range(count)
    ]  # fmt: skip


def stored(run: Run) -> dict:
    return {field.attname: getattr(run, field.attname) for field in Run._meta.concrete_fields}


@pytest.mark.parametrize("count", [1, PLAIN_INSERT_ROWS_MAX, PLAIN_INSERT_ROWS_MAX + 1, 250])
def test_inserted_runs_read_back_as_built(db, count):
    runs = built(count, parent=RunFactory(status=RunStatus.WAITING))

    runs_insert(runs)

    by_id = {run.pk: run for run in Run.objects.filter(pk__in=[run.pk for run in runs])}
    assert [stored(by_id[run.pk]) for run in runs] == [stored(run) for run in runs]


def test_inserted_runs_are_saved_instances(db):
    runs = built(PLAIN_INSERT_ROWS_MAX + 1, parent=RunFactory())

    runs_insert(runs)

    assert all(not run._state.adding for run in runs)
    assert isinstance(runs[0].pk, uuid.UUID)


@pytest.mark.parametrize("count", [1, 20])
def test_submitted_runs_read_back_as_they_were_built(db, user, count):
    requests = [RunRequest(agent="echo", input={"n": n}, idempotency_key=f"k{n}", expires_in=60) for n in range(count)]

    built_runs = [run for run, _ in run_submit_many(user=user, requests=requests)]

    by_id = {run.pk: run for run in Run.objects.filter(pk__in=[run.pk for run in built_runs])}
    assert [stored(by_id[run.pk]) for run in built_runs] == [stored(run) for run in built_runs]
    assert (built_runs[0].agent.name, built_runs[0].submitted_by) == ("echo", user)


@pytest.mark.parametrize("count", [1, PLAIN_INSERT_ROWS_MAX + 1])
def test_a_run_whose_idempotency_key_is_taken_fails_the_insert_with_djangos_integrity_error(db, count):
    taken = RunFactory(idempotency_key="taken")
    runs = built(count, parent=RunFactory(submitted_by=taken.submitted_by))
    runs[-1].idempotency_key = "taken"

    with pytest.raises(IntegrityError), transaction.atomic():
        runs_insert(runs)

    assert not Run.objects.filter(pk__in=[run.pk for run in runs]).exists()
