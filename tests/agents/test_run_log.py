"""What an agent logs through ctx.logger, and the error of every failed attempt, are kept with its run."""

import pytest
from django.utils import timezone

from agents.models import Agent, Run, RunStatus
from agents.runs.execute import runs_execute
from agents.runs.finish import ATTEMPT_ERRORS_KEPT, ATTEMPT_TRACEBACK_MAX_CHARS, attempt_errors_after, worker_lost
from tests.factories import RunFactory
from tests.polling import eventually

CUT = "[log cut: RUN_LOG_MAX_BYTES reached]\n"


@pytest.fixture
def chatty(transactional_db) -> Agent:
    return Agent.objects.get(name="test.chatty")


def executed(run: Run) -> Run:
    """One attempt of `run` in this process, as a worker makes it; the row as it stands afterwards."""
    runs_execute(run_ids=[str(run.pk)], worker="w1")
    return Run.objects.get(pk=run.pk)


def finished(run: Run) -> Run:
    """The run's row once it is terminal."""
    return eventually(lambda: (row := Run.objects.get(pk=run.pk)).is_terminal and row, what=f"the end of run {run.pk}")


def test_what_an_agent_logs_is_kept_with_its_run(chatty):
    run = executed(RunFactory(agent=chatty, input={"lines": 2}))

    assert run.status == RunStatus.SUCCEEDED
    lines = run.log.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO line 0 of attempt 1")
    assert lines[1].endswith("INFO line 1 of attempt 1")


def test_a_run_whose_agent_logs_nothing_has_an_empty_log(transactional_db):
    run = executed(RunFactory())

    assert run.status == RunStatus.SUCCEEDED
    assert run.log == ""


def test_the_log_is_cut_at_run_log_max_bytes(chatty, settings):
    settings.RUN_LOG_MAX_BYTES = 500

    run = executed(RunFactory(agent=chatty, input={"lines": 1000}))

    assert run.status == RunStatus.SUCCEEDED
    assert run.log.endswith(CUT)
    assert len(run.log.removesuffix(CUT).encode()) <= 500
    assert "line 0 of attempt 1" in run.log
    assert "line 999 " not in run.log


def test_each_failed_attempt_keeps_its_error_and_every_attempt_its_log(chatty):
    run = RunFactory(agent=chatty, input={"lines": 1, "fail_times": 2})

    after_first = executed(run)
    executed(run)
    run = executed(run)

    assert after_first.status == RunStatus.QUEUED
    assert [entry["attempt"] for entry in after_first.attempt_errors] == [1]
    assert run.status == RunStatus.SUCCEEDED
    assert run.error is None
    assert [(entry["attempt"], entry["type"], entry["message"]) for entry in run.attempt_errors] == [
        (1, "RuntimeError", "attempt 1 fails on purpose"),
        (2, "RuntimeError", "attempt 2 fails on purpose"),
    ]
    assert all("sample_agents.py" in entry["traceback"] for entry in run.attempt_errors)
    assert "line 0 of attempt 1" in run.log
    assert "--- attempt 2 ---\n" in run.log
    assert "--- attempt 3 ---\n" in run.log
    assert run.log.index("attempt 1") < run.log.index("--- attempt 2 ---") < run.log.index("line 0 of attempt 3")


def test_what_an_agent_logged_before_it_delegated_is_kept_with_what_its_continuation_logs(transactional_db):
    run = RunFactory(agent=Agent.objects.get(name="test.chatty_delegate"), input={})

    waiting = executed(run)
    executed(Run.objects.get(parent=run))
    # The child's end and the parent's resumption are also published: a worker another test left
    # running may take either first, so the parent is waited for, whoever executes it.
    run = finished(executed(run))

    assert waiting.status == RunStatus.WAITING
    assert "INFO handing over to a child" in waiting.log
    assert run.status == RunStatus.SUCCEEDED
    assert run.log.index("handing over to a child") < run.log.index("INFO the child ended")


def test_a_run_out_of_retries_keeps_every_attempts_error_and_the_last_as_its_error(chatty):
    run = RunFactory(agent=chatty, input={"fail_times": 5}, max_retries=1)

    executed(run)
    run = executed(run)

    assert run.status == RunStatus.FAILED
    assert [entry["message"] for entry in run.attempt_errors] == [
        "attempt 1 fails on purpose",
        "attempt 2 fails on purpose",
    ]
    assert run.error["message"] == "attempt 2 fails on purpose"


def test_an_attempt_whose_worker_died_is_kept_among_the_errors(transactional_db):
    run = RunFactory(status=RunStatus.RUNNING, worker="w1", attempts=1, started_at=timezone.now())

    assert worker_lost(run, dispatch=False)

    run = Run.objects.get(pk=run.pk)
    assert run.status == RunStatus.QUEUED
    assert [(entry["attempt"], entry["type"]) for entry in run.attempt_errors] == [(1, "WorkerLost")]


def test_attempt_errors_keep_the_latest_attempts_and_the_end_of_long_tracebacks(db):
    run = RunFactory.build(attempts=ATTEMPT_ERRORS_KEPT + 1)
    run.attempt_errors = [{"attempt": number} for number in range(1, ATTEMPT_ERRORS_KEPT + 1)]
    traceback = "start\n" + "x" * ATTEMPT_TRACEBACK_MAX_CHARS + "\nValueError: the end"

    errors = attempt_errors_after(
        run, {"type": "ValueError", "message": "the end", "traceback": traceback}, at=timezone.now()
    )

    assert len(errors) == ATTEMPT_ERRORS_KEPT
    assert errors[0]["attempt"] == 2
    assert errors[-1]["attempt"] == ATTEMPT_ERRORS_KEPT + 1
    assert errors[-1]["traceback"].endswith("ValueError: the end")
    assert not errors[-1]["traceback"].startswith("start")
    assert len(errors[-1]["traceback"]) == ATTEMPT_TRACEBACK_MAX_CHARS + 1


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_a_worker_keeps_the_log_and_each_attempts_error_of_the_runs_it_executes(api, chatty):
    body = {"agent": "test.chatty", "input": {"lines": 2, "fail_times": 1}}
    run_id = api.post("/api/v1/runs/", body, format="json").json()["id"]

    assert api.get(f"/api/v1/runs/{run_id}/", {"wait": 20}).json()["status"] == "succeeded"
    run = Run.objects.get(pk=run_id)
    assert [entry["type"] for entry in run.attempt_errors] == ["RuntimeError"]
    assert "line 1 of attempt 1" in run.log
    assert "--- attempt 2 ---\n" in run.log
    assert "line 1 of attempt 2" in run.log
