"""`manage.py submit`: one input or a JSONL file of them, in batches, bad lines reported by number, --wait."""

import io
import re

import pytest
from django.core.management import CommandError, call_command

from agents.models import Run, RunStatus
from tests.factories import StaffFactory, UserFactory

pytestmark = pytest.mark.usefixtures("transactional_db")


def submit(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("submit", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def jsonl(tmp_path, *lines: str) -> str:
    path = tmp_path / "inputs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_one_input_is_submitted_as_the_first_staff_user_and_its_id_printed():
    staff = StaffFactory()
    StaffFactory()

    out, _ = submit("echo", "--input", '{"hello": "world"}')

    run = Run.objects.get()
    assert out.strip() == str(run.pk)
    assert run.input == {"hello": "world"}
    assert run.submitted_by == staff
    assert run.agent.name == "echo"


def test_the_runs_are_submitted_as_the_user_named():
    StaffFactory()
    alice = UserFactory(username="alice")

    submit("echo", "--input", "{}", "--user", "alice")

    assert Run.objects.get().submitted_by == alice


def test_a_file_goes_in_batches_of_run_batch_max_items(tmp_path, settings, published):
    settings.RUN_BATCH_MAX_ITEMS = 2
    StaffFactory()

    out, _ = submit("echo", "--file", jsonl(tmp_path, *(f'{{"n": {n}}}' for n in range(5))))

    assert "Submitted 5 runs of echo." in out
    assert sorted(run.input["n"] for run in Run.objects.all()) == [0, 1, 2, 3, 4]
    # each batch travels in a message of its own
    assert sorted(len(message) for message in published) == [1, 2, 2]


def test_a_tier_is_given_to_every_run():
    StaffFactory()

    submit("echo", "--input", "{}", "--tier", "batch")

    assert Run.objects.get().tier == "batch"


def test_an_unknown_agent_is_refused_in_one_line_and_nothing_is_stored(tmp_path):
    StaffFactory()

    with pytest.raises(CommandError) as error:
        submit("no-such-agent", "--file", jsonl(tmp_path, "{}", "{}"))

    assert str(error.value) == "agent: Unknown agent 'no-such-agent'."
    assert not Run.objects.exists()


def test_the_critical_tier_needs_the_permission_for_the_user_named():
    StaffFactory()
    UserFactory(username="bob")

    with pytest.raises(CommandError) as error:
        submit("echo", "--input", "{}", "--tier", "critical", "--user", "bob")

    assert "agents.submit_critical" in str(error.value)
    assert not Run.objects.exists()


def test_an_input_that_is_not_json_is_refused():
    StaffFactory()

    with pytest.raises(CommandError) as error:
        submit("echo", "--input", "{hello")

    assert str(error.value).startswith("--input is not JSON")
    assert not Run.objects.exists()


def test_an_unknown_user_is_refused():
    with pytest.raises(CommandError) as error:
        submit("echo", "--input", "{}", "--user", "nobody")

    assert str(error.value) == "No active user 'nobody'."


def test_without_a_staff_user_a_user_must_be_named():
    UserFactory()

    with pytest.raises(CommandError) as error:
        submit("echo", "--input", "{}")

    assert "--user" in str(error.value)


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_bad_lines_are_reported_by_number_and_the_good_ones_still_run(tmp_path):
    StaffFactory()
    path = jsonl(tmp_path, '{"seconds": 0}', "not json", "", '{"seconds": "soon"}', "[1, 2]", '{"seconds": 0.1}')
    out, err = io.StringIO(), io.StringIO()

    with pytest.raises(CommandError) as error:
        call_command("submit", "sleep", "--file", path, "--wait", "--timeout", "120", stdout=out, stderr=err)

    reported = [line for line in err.getvalue().splitlines() if line.startswith("line ")]
    assert [line.split(":")[0] for line in reported] == ["line 2", "line 4", "line 5"]
    assert "input: Not JSON" in reported[0]
    assert "input.seconds" in reported[1]
    assert "input: Expected a JSON object." in reported[2]
    assert str(error.value) == "3 of 5 lines were not submitted (see above); the other 2 runs were."
    assert sorted(run.input["seconds"] for run in Run.objects.all()) == [0, 0.1]
    assert set(Run.objects.values_list("status", flat=True)) == {RunStatus.SUCCEEDED}
    assert "2 runs: 2 succeeded" in out.getvalue()


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_wait_shows_progress_then_a_summary_of_outcomes_and_latency(tmp_path):
    StaffFactory()
    path = jsonl(tmp_path, '{"fail_times": 0}', '{"fail_times": 0}', '{"fail_times": 10}')

    out, err = submit("test.flaky", "--file", path, "--wait", "--timeout", "120")

    assert "3/3 finished" in err
    summary = out.splitlines()[-1]
    assert re.fullmatch(
        r"3 runs: 2 succeeded \(0 cached, 0 coalesced\), 1 failed, 0 cancelled, 0 expired; "
        r"latency p50 \d+ ms, p95 \d+ ms",
        summary,
    ), summary


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
def test_the_summary_counts_runs_that_shared_another_runs_execution(tmp_path):
    StaffFactory()
    same = '{"key": "submit-command", "seconds": 1}'

    out, _ = submit("test.cached_count", "--file", jsonl(tmp_path, same, same, same), "--wait", "--timeout", "120")

    assert "3 runs: 3 succeeded (0 cached, 2 coalesced)" in out.splitlines()[-1]
