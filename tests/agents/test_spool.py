"""What a pool process finished but had not written yet is recorded when it dies, never run again."""

import functools
import os
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Run, RunStatus
from agents.runs.delegation import Child, Delegation
from agents.runs.execute import message_lost, pool_process_died, runs_claim, spooled_record_all
from agents.runs.finish import Attempt, worker_lost
from agents.runs.lease import Heartbeat, board
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


def died_holding(worker: str, claimed: list[Run], *, finished: Run, executing: Run) -> int:
    """A real process that holds `claimed` on the board, spools `finished`, calls `executing`'s agent and is
    killed there, as a pool process killed before its worker learnt it had taken its message; its pid."""
    now = timezone.now()
    attempt = Attempt(run=finished, started_at=now, finished_at=now, run_ms=1, result={"done": True})
    pid = os.fork()
    if pid == 0:
        # The child touches neither the database nor Redis: the board and a file are what it leaves. Whatever
        # happens, it never returns into the test run.
        try:
            board.hold([run.pk for run in claimed])
            spool = OutcomeSpool.of_this_process(worker)
            spool.begin(claimed_at=claimed[0].started_at)
            spool.add(attempt)
            board.executing_now(executing.pk)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid


def test_the_heartbeat_records_what_a_dead_process_finished_and_queues_the_rest_again(published):
    claimed = runs_claim(run_ids=[RunFactory().pk for _ in range(3)], worker="w6")
    finished, executing, waiting = claimed
    dead = died_holding("w6", claimed, finished=finished, executing=executing)

    Heartbeat(worker="w6", on_process_died=functools.partial(pool_process_died, worker="w6")).beat()

    rows = {run.pk: run for run in Run.objects.filter(pk__in=[run.pk for run in claimed])}
    assert (rows[finished.pk].status, rows[finished.pk].result) == (RunStatus.SUCCEEDED, {"done": True})
    # Lost with its process: queued again without spending one of the agent's retries.
    assert (rows[executing.pk].status, rows[executing.pk].lost_attempts) == (RunStatus.QUEUED, 1)
    # Not started: its attempt is not counted, and it lost nothing.
    assert (rows[waiting.pk].status, rows[waiting.pk].attempts, rows[waiting.pk].lost_attempts) == (
        RunStatus.QUEUED, 0, 0,
    )  # fmt: skip
    assert sorted(run_id for message in published for run_id in message) == sorted([str(executing.pk), str(waiting.pk)])
    assert dead not in board.holders()
    OutcomeSpool(worker="w6", pid=dead).clear()


def test_a_lost_message_leaves_alone_the_runs_another_process_of_its_worker_claimed_since():
    first, second = claimed_with_first_finished("w7")
    # The second run went back and another process of the same worker claimed it again, later.
    Run.objects.filter(pk=second.pk).update(started_at=timezone.now() + timedelta(seconds=1))

    message_lost(run_ids=[str(first.pk), str(second.pk)], worker="w7", pid=DEAD_PID)

    second.refresh_from_db()
    assert (second.status, second.worker) == (RunStatus.RUNNING, "w7")


def test_a_run_lost_with_its_process_leaves_the_other_runs_of_its_claim_alone():
    lost, other = runs_claim(run_ids=[RunFactory().pk, RunFactory().pk], worker="w8")

    worker_lost(lost)

    other.refresh_from_db()
    assert (other.status, other.lost_attempts) == (RunStatus.RUNNING, 0)
