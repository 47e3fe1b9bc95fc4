"""Cancelling a run with a tree below it: every run in flight ends, at a cost per level, heard in order."""

import threading
import time

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus
from agents.runs import finish
from agents.runs.cancellation import run_cancel
from agents.runs.recovery import sweep
from tests.factories import RunFactory

pytestmark = pytest.mark.django_db(transaction=True)


def fan_out(children: int, *, status: str = RunStatus.QUEUED) -> tuple[Run, list[Run]]:
    """A waiting parent with `children` runs below it in `status`."""
    parent = RunFactory(status=RunStatus.WAITING)
    below = [
        RunFactory(parent=parent, root=parent.pk, submitted_by=parent.submitted_by, status=status, input={"n": n})
        for n in range(children)
    ]
    return parent, below


def statements_to_cancel(parent: Run) -> int:
    with CaptureQueriesContext(connection) as queries:
        run_cancel(run=parent)
    return len(queries)


def test_cancelling_a_parent_costs_as_many_statements_for_two_hundred_children_as_for_five():
    few, _ = fan_out(5)
    many, _ = fan_out(200)

    assert statements_to_cancel(many) == statements_to_cancel(few)
    assert set(Run.objects.filter(parent=many).values_list("status", flat=True)) == {RunStatus.CANCELLED}


def test_cancelling_a_parent_ends_every_run_in_flight_at_every_level_and_leaves_finished_ones():
    parent, (queued, running) = fan_out(2)
    Run.objects.filter(pk=running.pk).update(status=RunStatus.RUNNING, worker="w1")
    done = RunFactory(parent=parent, root=parent.pk, submitted_by=parent.submitted_by, finished=True)
    grandchild = RunFactory(parent=queued, root=parent.pk, submitted_by=parent.submitted_by, input={"n": 9})

    run_cancel(run=parent)

    statuses = dict(Run.objects.values_list("pk", "status"))
    assert [statuses[run.pk] for run in (parent, queued, running, grandchild)] == [RunStatus.CANCELLED] * 4
    assert statuses[done.pk] == RunStatus.SUCCEEDED


def test_only_the_runs_executing_somewhere_are_named_on_the_cancel_channel():
    parent, (_queued, running) = fan_out(2)
    Run.objects.filter(pk=running.pk).update(status=RunStatus.RUNNING, worker="w1")
    pubsub = redis_client().pubsub()
    pubsub.subscribe(events.cancel_channel())
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"

    run_cancel(run=parent)

    named = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        named.append(message["data"].decode())
    pubsub.close()
    # The parent itself is named as any cancelled run is; of its children, only the running one.
    assert named == [str(parent.pk), str(running.pk)]


# A worker's bulk write holds one child while it wants the other; either may be the one the cancel meets first.
# The write lasts 0.5 s: within the time the cancel skips held rows, or past it (then it waits for each).
@pytest.mark.parametrize("skip_seconds", [1.0, 0.1])
@pytest.mark.parametrize("holds_first", [0, 1])
def test_a_worker_writing_children_meanwhile_neither_deadlocks_with_the_cancel_nor_keeps_one_running(
    holds_first, skip_seconds, monkeypatch
):
    monkeypatch.setattr(finish, "CANCEL_SKIP_SECONDS", skip_seconds)
    parent, children = fan_out(2)
    held, wanted = children[holds_first], children[1 - holds_first]
    locked, errors = threading.Event(), []

    def worker_writes_both() -> None:
        try:
            with transaction.atomic():
                Run.objects.filter(pk=held.pk).update(worker="w1")
                locked.set()
                time.sleep(0.5)
                Run.objects.filter(pk=wanted.pk).update(worker="w1")
        except DatabaseError as exc:
            errors.append(exc)
        finally:
            connection.close()

    writer = threading.Thread(target=worker_writes_both)
    writer.start()
    assert locked.wait(5)
    try:
        run_cancel(run=parent)
    except DatabaseError as exc:
        errors.append(exc)
    writer.join(10)

    assert errors == []
    assert set(Run.objects.filter(parent=parent).values_list("status", flat=True)) == {RunStatus.CANCELLED}


def test_the_sweeper_cancels_what_a_cancel_cut_short_left_in_flight_below_a_cancelled_run():
    parent, (queued, waiting) = fan_out(2)
    Run.objects.filter(pk=waiting.pk).update(status=RunStatus.WAITING)
    grandchild = RunFactory(parent=waiting, root=parent.pk, submitted_by=parent.submitted_by, input={"n": 9})
    # The parent's own cancel was written, and then the process cancelling the runs below it died.
    Run.objects.filter(pk=parent.pk).update(status=RunStatus.CANCELLED)

    report = sweep()

    assert report.orphans_cancelled == 3
    statuses = dict(Run.objects.values_list("pk", "status"))
    assert {statuses[run.pk] for run in (queued, waiting, grandchild)} == {RunStatus.CANCELLED}
