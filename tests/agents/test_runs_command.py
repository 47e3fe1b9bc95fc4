"""`manage.py runs`: recent runs listed with filters, and `--follow` printing run events until Ctrl-C."""

import io
import signal
import subprocess
import sys
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from agentplatform import events
from agents.models import Agent, RunStatus
from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory, StaffFactory, UserFactory


def runs(*args: str) -> list[str]:
    out = io.StringIO()
    call_command("runs", *args, stdout=out)
    return out.getvalue().splitlines()


def listed_ids(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines[1:]]


def test_recent_runs_are_listed_newest_first_up_to_the_limit(db):
    StaffFactory()
    now = timezone.now()
    made = [RunFactory(submitted_at=now - timedelta(minutes=minutes)) for minutes in (3, 1, 2)]

    lines = runs("--limit", "2")

    assert lines[0].split()[:4] == ["ID", "AGENT", "TIER", "STATUS"]
    assert listed_ids(lines) == [str(made[1].pk), str(made[2].pk)]


def test_runs_are_filtered_by_agent_status_and_tier(db):
    StaffFactory()
    sleep = Agent.objects.get(name="sleep")
    wanted = RunFactory(agent=sleep, tier="batch", finished=True)
    RunFactory(agent=sleep, tier="batch")
    RunFactory(agent=sleep, tier="standard", finished=True)
    RunFactory(tier="batch", finished=True)

    lines = runs("--agent", "sleep", "--status", "succeeded", "--tier", "batch")

    assert listed_ids(lines) == [str(wanted.pk)]
    assert lines[1].split()[1:4] == ["sleep", "batch", "succeeded"]


def test_a_user_named_sees_only_their_own_runs(db):
    StaffFactory()
    alice = UserFactory(username="alice")
    own = RunFactory(submitted_by=alice)
    RunFactory()

    assert listed_ids(runs("--user", "alice")) == [str(own.pk)]


def test_a_cached_run_and_a_follower_say_so(db):
    StaffFactory()
    leader = RunFactory(submitted_at=timezone.now() - timedelta(seconds=2))
    follower = RunFactory(follows=leader, submitted_at=timezone.now() - timedelta(seconds=1))
    RunFactory(cached=True, finished=True)

    lines = runs()

    assert lines[1].endswith("cached")
    assert lines[2].endswith(f"follows {leader.pk}")
    assert listed_ids(lines)[1] == str(follower.pk)


def test_no_runs_says_so(db):
    StaffFactory()

    assert runs() == ["No runs."]


def test_an_unknown_status_is_refused():
    with pytest.raises(CommandError) as error:
        runs("--status", "finished")

    assert "invalid choice: 'finished'" in str(error.value)


def test_an_unknown_agent_is_refused(db):
    StaffFactory()

    with pytest.raises(CommandError) as error:
        runs("--agent", "no-such-agent")

    assert str(error.value) == "Unknown agent 'no-such-agent'."


@pytest.mark.slow
def test_follow_prints_the_events_of_the_agent_until_interrupted(transactional_db):
    StaffFactory()
    command = [sys.executable, "manage.py", "runs", "--follow", "--limit", "0", "--agent", "echo"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # It says so once its subscription is confirmed: no event published after that is missed.
        notice = ""
        while "Following" not in notice:
            notice = process.stderr.readline()
            assert notice, f"runs --follow stopped: {process.stderr.read()}"
        run = RunFactory(status=RunStatus.SUCCEEDED)
        other = RunFactory(agent=Agent.objects.get(name="sleep"))
        # Published together: one message on the agent's channel carries both of the run's events.
        published = [events.event_of_run(other, "queued"), events.event_of_run(run, "started")]
        events.publish_run_events([*published, events.event_of_run(run, "succeeded")])

        lines = [process.stdout.readline(), process.stdout.readline()]
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert [line.split()[1:5] for line in lines] == [
        ["started", str(run.pk), "echo", "standard"],
        ["succeeded", str(run.pk), "echo", "standard"],
    ]
    assert str(other.pk) not in "".join(lines) + out
    assert process.returncode == 0


def test_the_listing_shows_timings_of_a_finished_run(db):
    StaffFactory()
    RunFactory(finished=True, queue_wait_ms=12, run_ms=345)

    header, row = runs()

    assert row.split()[6:8] == ["12", "345"]
    assert header.split()[5:9] == ["WAIT", "MS", "RUN", "MS"]
