"""What a pool process finished but had not written yet is recorded when it dies, never run again."""

import pytest
from django.utils import timezone

from agents.models import Run, RunStatus
from agents.runs.delegation import Child, Delegation
from agents.runs.execute import message_lost, runs_claim, spooled_record_all
from agents.runs.finish import Attempt
from agents.runs.spool import OutcomeSpool
from tests.factories import RunFactory

pytestmark = pytest.mark.django_db

DEAD_PID = 4_000_000  # above any pid Linux hands out


def claimed_with_first_finished(worker: str) -> list[Run]:
    """Two runs claimed by `worker`, the first finished by a process that then died with it in its spool."""
    claimed = runs_claim(run_ids=[RunFactory().pk, RunFactory().pk], worker=worker)
    spool = OutcomeSpool(worker=worker, pid=DEAD_PID)
    spool.begin(claimed_at=claimed[0].started_at)
    now = timezone.now()
    spool.add(Attempt(run=claimed[0], started_at=now, finished_at=now, run_ms=1, result={"done": True}))
    return claimed


def test_a_dead_processs_finished_run_is_recorded_and_the_rest_of_its_message_goes_back():
    first, second = claimed_with_first_finished("w1")

    message_lost(run_ids=[str(first.pk), str(second.pk)], worker="w1", pid=DEAD_PID)

    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, first.result) == (RunStatus.SUCCEEDED, {"done": True})
    assert second.status == RunStatus.QUEUED
    assert not OutcomeSpool(worker="w1", pid=DEAD_PID).path.exists()


def test_a_worker_starting_records_what_its_dead_predecessor_had_finished():
    first, second = claimed_with_first_finished("w2")

    spooled_record_all(worker="w2")

    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == RunStatus.SUCCEEDED
    assert second.status == RunStatus.RUNNING  # its lease brings it back


def test_a_spool_of_a_live_process_is_left_alone():
    first, _ = claimed_with_first_finished("w3")

    spooled_record_all(worker="w3", live={DEAD_PID})

    first.refresh_from_db()
    assert first.status == RunStatus.RUNNING
    OutcomeSpool(worker="w3", pid=DEAD_PID).clear()


def test_a_spool_for_a_claim_already_taken_back_records_nothing():
    first, _ = claimed_with_first_finished("w4")
    Run.objects.filter(pk=first.pk).update(status=RunStatus.QUEUED, worker="")

    spooled_record_all(worker="w4")

    first.refresh_from_db()
    assert first.status == RunStatus.QUEUED


def test_a_dead_processs_delegation_is_recorded_as_the_run_waiting_for_its_children():
    (parent,) = runs_claim(run_ids=[RunFactory().pk], worker="w5")
    spool = OutcomeSpool(worker="w5", pid=DEAD_PID)
    spool.begin(claimed_at=parent.started_at)
    now = timezone.now()
    children = (Child("echo", {"n": 1}), Child("echo", {"n": 2}, tier="batch", cache="bypass"))
    delegation = Delegation(kind="children", then="agent:echo", state={"k": [1]}, children=children)
    spool.add(Attempt(run=parent, started_at=now, finished_at=now, run_ms=1, delegation=delegation))

    message_lost(run_ids=[str(parent.pk)], worker="w5", pid=DEAD_PID)

    parent.refresh_from_db()
    assert (parent.status, parent.pending_children, parent.resume["state"]) == (RunStatus.WAITING, 2, {"k": [1]})
    kids = Run.objects.filter(parent=parent).order_by("sibling_index")
    assert [(kid.input, kid.tier) for kid in kids] == [({"n": 1}, parent.tier), ({"n": 2}, "batch")]
