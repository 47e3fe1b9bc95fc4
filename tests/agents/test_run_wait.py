"""Waiting on a run (`?wait=`): woken by the run's own end, not by the events of the tree below it."""

import threading
import time
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Run, RunStatus
from agents.runs.waiting import run_wait
from tests.factories import RunFactory

pytestmark = pytest.mark.usefixtures("transactional_db")


def children_ending(parent, *, count: int, every: float) -> threading.Thread:
    """Publish the ends of `count` children of `parent`, one each `every` seconds, as their workers would."""

    def publish() -> None:
        for _ in range(count):
            time.sleep(every)
            child = events.run_event(
                event="succeeded", run_id=uuid.uuid4(), agent="echo", tier=parent.tier, status=RunStatus.SUCCEEDED,
                attempt=1, user=parent.submitted_by_id, parent=parent.pk, root=parent.pk,
            )  # fmt: skip
            events.publish_run_events([child])

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    return thread


def test_a_parent_waited_on_is_not_read_again_for_each_child_that_ends():
    parent = RunFactory(status=RunStatus.WAITING)
    publishing = children_ending(parent, count=40, every=0.02)

    with CaptureQueriesContext(connection) as queries:
        run = run_wait(run_id=parent.pk, user=parent.submitted_by, timeout=1.2)
    publishing.join()

    assert run.status == RunStatus.WAITING
    # the one read after subscribing; a child's end is news of the tree, not of this run
    assert len(queries) == 1, [query["sql"][:60] for query in queries]


def test_a_waiter_is_woken_by_its_own_runs_end():
    run = RunFactory(status=RunStatus.RUNNING)

    def finish() -> None:
        time.sleep(0.3)
        Run.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
        events.publish_run_events([events.event_of_run(Run.objects.get(pk=run.pk), "succeeded")])

    threading.Thread(target=finish, daemon=True).start()
    started = time.monotonic()
    finished = run_wait(run_id=run.pk, user=run.submitted_by, timeout=4)

    assert finished.status == RunStatus.SUCCEEDED
    assert time.monotonic() - started < 3


def test_a_wait_leaves_the_connections_of_commands_connected():
    run = RunFactory(status=RunStatus.QUEUED)
    client = redis_client()
    connection_before = client.client_id()

    run_wait(run_id=run.pk, user=run.submitted_by, timeout=0.05)

    # the subscription's connection, disconnected as it closed, was not one that commands take
    assert client.client_id() == connection_before
