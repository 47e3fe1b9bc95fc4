"""Scheduled runs: the beat entry follows its schedule, the admin names bad fields, each firing submits a run."""

import json
import logging
import subprocess
import sys
import time

import pytest
from celery.signals import beat_init
from django.urls import reverse
from django_celery_beat.models import PeriodicTask

from agentplatform.celery import HOUSEKEEPING_QUEUE
from agents.models import Agent, Run, RunSchedule, RunStatus
from agents.schedules import FIRE_SCHEDULE_TASK, ScheduleInvalid, schedule_delete, schedule_fire, schedule_save
from agents.tasks import fire_schedule
from scheduling.tiers import Tier
from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory, UserFactory

SCHEDULES_URL = reverse("admin:agents_runschedule_changelist")
ADD_URL = reverse("admin:agents_runschedule_add")
BEAT_WAIT_SECONDS = 20


def make_schedule(*, owner, agent: str = "echo", **fields) -> RunSchedule:
    fields = {"name": "echo schedule", "input": {"hello": "world"}, **fields}
    return schedule_save(schedule=RunSchedule(agent=Agent.objects.get(name=agent), owner=owner, **fields))


def beat_entry(schedule: RunSchedule) -> PeriodicTask:
    schedule.refresh_from_db()
    return PeriodicTask.objects.select_related("crontab", "interval").get(pk=schedule.periodic_task_id)


def crontab_of(task: PeriodicTask) -> str:
    crontab = task.crontab
    return " ".join([crontab.minute, crontab.hour, crontab.day_of_month, crontab.month_of_year, crontab.day_of_week])


def schedule_form(**changes) -> dict:
    """The add form as a browser would post it, with `changes` applied."""
    data = {
        "name": "morning echo",
        "agent": Agent.objects.get(name="echo").pk,
        "input": json.dumps({"hello": "world"}),
        "tier": "",
        "owner": "",
        "enabled": "on",
        "cron": "0 6 * * *",
        "interval_seconds": "",
        **changes,
    }
    return {field: value for field, value in data.items() if value is not None}


def test_saving_a_cron_schedule_creates_an_enabled_periodic_task_with_its_crontab(user):
    schedule = make_schedule(owner=user, cron="30 6 * * 1-5")

    task = beat_entry(schedule)
    assert task.enabled is True
    assert task.task == FIRE_SCHEDULE_TASK
    assert json.loads(task.kwargs) == {"schedule_id": schedule.pk}
    assert task.queue == HOUSEKEEPING_QUEUE  # firing never waits behind agent work
    assert crontab_of(task) == "30 6 * * 1-5"
    assert task.interval is None


def test_beat_moves_the_firings_of_schedules_saved_before_onto_the_housekeeping_queue(user):
    schedule = make_schedule(owner=user, interval_seconds=60)
    PeriodicTask.objects.filter(pk=schedule.periodic_task_id).update(queue="critical")  # as saved before

    beat_init.send(sender=None)

    assert beat_entry(schedule).queue == HOUSEKEEPING_QUEUE


def test_saving_an_interval_schedule_creates_an_enabled_periodic_task_every_so_many_seconds(user):
    schedule = make_schedule(owner=user, interval_seconds=90)

    task = beat_entry(schedule)
    assert task.enabled is True
    assert task.task == FIRE_SCHEDULE_TASK
    assert json.loads(task.kwargs) == {"schedule_id": schedule.pk}
    assert (task.interval.every, task.interval.period) == (90, "seconds")
    assert task.crontab is None


def test_disabling_a_schedule_disables_its_periodic_task(user):
    schedule = make_schedule(owner=user, interval_seconds=60)

    schedule.enabled = False
    schedule_save(schedule=schedule)

    assert beat_entry(schedule).enabled is False


def test_changing_cron_to_interval_updates_the_same_periodic_task(user):
    schedule = make_schedule(owner=user, cron="0 * * * *")
    task_id = schedule.periodic_task_id

    schedule.cron, schedule.interval_seconds = "", 300
    schedule_save(schedule=schedule)

    task = beat_entry(schedule)
    assert task.pk == task_id
    assert (task.interval.every, task.crontab) == (300, None)
    assert PeriodicTask.objects.filter(task=FIRE_SCHEDULE_TASK).count() == 1


def test_deleting_a_schedule_deletes_its_periodic_task(user):
    schedule = make_schedule(owner=user, interval_seconds=60)
    task_id = schedule.periodic_task_id

    schedule_delete(schedule=schedule)

    assert not RunSchedule.objects.exists()
    assert not PeriodicTask.objects.filter(pk=task_id).exists()


def test_saving_an_invalid_schedule_raises_field_errors_and_stores_nothing(user):
    with pytest.raises(ScheduleInvalid) as caught:
        make_schedule(owner=user, agent="test.flaky", input={"fail_times": -1}, cron="0 25 * * *")

    assert set(caught.value.errors) == {"input", "cron"}
    assert not RunSchedule.objects.exists()
    assert not PeriodicTask.objects.filter(task=FIRE_SCHEDULE_TASK).exists()


def test_a_disabled_schedule_may_name_a_disabled_agent_but_an_enabled_one_may_not(user):
    Agent.objects.filter(name="echo").update(enabled=False)

    schedule = make_schedule(owner=user, interval_seconds=60, enabled=False)
    schedule.enabled = True
    with pytest.raises(ScheduleInvalid) as caught:
        schedule_save(schedule=schedule)

    assert caught.value.errors == {"agent": ["Agent 'echo' is disabled; enable it or disable this schedule."]}
    assert beat_entry(schedule).enabled is False


def test_admin_add_stores_the_schedule_for_the_operator_with_its_periodic_task(staff_client, staff):
    response = staff_client.post(ADD_URL, schedule_form(tier="critical"))

    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    schedule = RunSchedule.objects.get()
    assert (schedule.name, schedule.owner, schedule.tier) == ("morning echo", staff, "critical")
    assert (schedule.cron, schedule.input) == ("0 6 * * *", {"hello": "world"})
    task = beat_entry(schedule)
    assert crontab_of(task) == "0 6 * * *"
    assert json.loads(task.kwargs) == {"schedule_id": schedule.pk}


def test_admin_add_form_offers_the_operator_as_owner(staff_client, staff):
    response = staff_client.get(ADD_URL)

    assert response.status_code == 200
    assert response.context["adminform"].form.initial["owner"] == staff.pk


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"cron": "61 * * * *"}, "cron", "Not a crontab expression: '61', not in 0-59 for Minutes"),
        ({"cron": "0 6 * *"}, "cron", "Not a crontab expression: Expected 5 fields"),
        ({"input": "[1, 2]"}, "input", "Expected a JSON object."),
        ({"input": "{not json"}, "input", "Enter a valid JSON."),
        ({"agent": 999_999}, "agent", "Select a valid choice."),
        ({"tier": "urgent"}, "tier", "Select a valid choice."),
        ({"interval_seconds": "60"}, "interval_seconds", "Give either a cron expression or an interval, not both."),
        ({"interval_seconds": "60"}, "cron", "Give either a cron expression or an interval, not both."),
        ({"cron": ""}, "cron", "Give a cron expression or an interval in seconds."),
        ({"cron": ""}, "interval_seconds", "Give a cron expression or an interval in seconds."),
        ({"cron": "", "interval_seconds": "0"}, "interval_seconds", "Must be at least 1 second."),
    ],
)
def test_admin_add_names_the_invalid_field_and_stores_nothing(staff_client, changes, field, message):
    response = staff_client.post(ADD_URL, schedule_form(**changes))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert any(error.startswith(message) for error in errors.get(field, [])), errors
    assert not RunSchedule.objects.exists()
    assert not PeriodicTask.objects.filter(task=FIRE_SCHEDULE_TASK).exists()


def test_admin_add_rejects_input_the_agent_schema_refuses(staff_client):
    form = schedule_form(agent=Agent.objects.get(name="test.flaky").pk, input=json.dumps({"fail_times": -1}))

    response = staff_client.post(ADD_URL, form)

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "input": ["fail_times: Input should be greater than or equal to 0"]
    }
    assert not RunSchedule.objects.exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"registered": False}, "Unknown agent 'echo': the code no longer declares it."),
        ({"enabled": False}, "Agent 'echo' is disabled; enable it or disable this schedule."),
    ],
)
def test_admin_add_rejects_an_agent_that_cannot_run(staff_client, state, message):
    Agent.objects.filter(name="echo").update(**state)

    response = staff_client.post(ADD_URL, schedule_form())

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {"agent": [message]}
    assert not RunSchedule.objects.exists()


def test_admin_change_disables_the_periodic_task(staff_client, staff):
    schedule = make_schedule(owner=staff, cron="0 6 * * *")
    url = reverse("admin:agents_runschedule_change", args=[schedule.pk])

    response = staff_client.post(url, schedule_form(name=schedule.name, owner=staff.pk, enabled=None))

    assert response.status_code == 302
    assert beat_entry(schedule).enabled is False


def test_admin_delete_removes_the_periodic_task(staff_client, staff):
    schedule = make_schedule(owner=staff, interval_seconds=60)
    task_id = schedule.periodic_task_id

    response = staff_client.post(reverse("admin:agents_runschedule_delete", args=[schedule.pk]), {"post": "yes"})

    assert response.status_code == 302
    assert not RunSchedule.objects.exists()
    assert not PeriodicTask.objects.filter(pk=task_id).exists()


def test_admin_bulk_delete_removes_the_periodic_tasks(staff_client, staff):
    schedules = [make_schedule(owner=staff, name=f"s{n}", interval_seconds=60) for n in range(2)]

    response = staff_client.post(
        SCHEDULES_URL,
        {"action": "delete_selected", "_selected_action": [s.pk for s in schedules], "post": "yes"},
    )

    assert response.status_code == 302
    assert not RunSchedule.objects.exists()
    assert not PeriodicTask.objects.filter(task=FIRE_SCHEDULE_TASK).exists()


def test_admin_lists_schedules_with_their_timing_and_last_run(staff_client, staff):
    make_schedule(owner=staff, name="hourly", cron="0 * * * *")
    fired = make_schedule(owner=staff, name="often", interval_seconds=30, tier="critical")
    run = RunFactory(submitted_by=staff)
    RunSchedule.objects.filter(pk=fired.pk).update(last_run=run)

    response = staff_client.get(SCHEDULES_URL)

    assert response.status_code == 200
    page = response.content.decode()
    assert "0 * * * *" in page
    assert "every 30 s" in page
    assert "Standard (agent&#x27;s)" in page
    assert reverse("admin:agents_run_change", args=[run.pk]) in page
    assert staff_client.get(reverse("admin:agents_runschedule_change", args=[fired.pk])).status_code == 200


def test_firing_submits_a_queued_run_for_the_owner_with_the_schedules_input_and_tier(api):
    schedule = make_schedule(owner=api.user, input={"n": 7}, tier="critical", interval_seconds=60)

    run = schedule_fire(schedule_id=schedule.pk)

    assert run.status == RunStatus.QUEUED
    assert (run.submitted_by, run.agent.name, run.input, run.tier) == (api.user, "echo", {"n": 7}, "critical")
    schedule.refresh_from_db()
    assert schedule.last_run == run
    listed = api.get("/api/v1/runs/").json()["results"]
    assert [(item["id"], item["input"], item["tier"]) for item in listed] == [(str(run.pk), {"n": 7}, "critical")]


def test_firing_a_schedule_without_a_tier_uses_the_agents_tier(user):
    Agent.objects.filter(name="echo").update(tier=Tier.BATCH)
    schedule = make_schedule(owner=user, interval_seconds=60)

    assert schedule_fire(schedule_id=schedule.pk).tier == Tier.BATCH


def test_a_firing_delivered_twice_submits_one_run(user):
    schedule = make_schedule(owner=user, interval_seconds=60)

    first = schedule_fire(schedule_id=schedule.pk, firing_id="task-1")
    again = schedule_fire(schedule_id=schedule.pk, firing_id="task-1")

    assert again == first
    assert Run.objects.count() == 1


def test_the_fire_schedule_task_submits_a_run_named_for_its_firing(user):
    schedule = make_schedule(owner=user, interval_seconds=60)

    result = fire_schedule.apply(kwargs={"schedule_id": schedule.pk})

    run = Run.objects.get()
    assert run.idempotency_key == f"schedule:{schedule.pk}:{result.id}"


def test_firing_a_disabled_schedule_submits_nothing(user):
    schedule = make_schedule(owner=user, interval_seconds=60, enabled=False)

    assert schedule_fire(schedule_id=schedule.pk) is None
    assert not Run.objects.exists()


def test_firing_a_deleted_schedule_submits_nothing(db):
    assert schedule_fire(schedule_id=123_456) is None
    assert not Run.objects.exists()


def test_firing_for_an_inactive_owner_submits_nothing(user):
    schedule = make_schedule(owner=user, interval_seconds=60)
    type(user).objects.filter(pk=user.pk).update(is_active=False)

    assert schedule_fire(schedule_id=schedule.pk) is None
    assert not Run.objects.exists()


def test_a_rejected_firing_is_logged_and_submits_nothing(user, caplog):
    schedule = make_schedule(owner=user, interval_seconds=60)
    Agent.objects.filter(name="echo").update(enabled=False)

    with caplog.at_level(logging.WARNING, logger="agents.schedules"):
        assert schedule_fire(schedule_id=schedule.pk) is None

    assert "run rejected" in caplog.text
    assert "is disabled" in caplog.text
    assert not Run.objects.exists()


def test_a_firing_refused_for_backlog_is_logged_and_submits_nothing(user, settings, caplog):
    settings.TIER_BACKLOG_LIMITS = {**settings.TIER_BACKLOG_LIMITS, Tier.STANDARD.value: 0}
    schedule = make_schedule(owner=user, interval_seconds=60)

    with caplog.at_level(logging.WARNING, logger="agents.schedules"):
        assert schedule_fire(schedule_id=schedule.pk) is None

    assert "run refused" in caplog.text
    assert not Run.objects.exists()
    schedule.refresh_from_db()
    assert schedule.last_run is None


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers", "housekeeping_worker")
def test_beat_fires_an_interval_schedule_and_a_worker_runs_each_firing(tmp_path):
    owner = UserFactory()
    schedule = make_schedule(owner=owner, name="every second", input={"beat": True}, interval_seconds=1)
    runs = Run.objects.filter(submitted_by=owner, idempotency_key__startswith=f"schedule:{schedule.pk}:")
    log, output = tmp_path / "beat.log", tmp_path / "beat.out"
    with output.open("wb") as out:
        beat = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "agentplatform", "beat",
                "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                "--max-interval", "1",
                "-s", str(tmp_path / "beat-schedule"),
                "--pidfile", str(tmp_path / "beat.pid"),
                "--loglevel", "INFO",
                "--logfile", str(log),
            ],
            cwd=ROOT, env=worker_env(), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + BEAT_WAIT_SECONDS
        while not (runs.count() >= 2 and runs.filter(status=RunStatus.SUCCEEDED).exists()):
            if beat.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(path.read_text()[-3000:] for path in (output, log) if path.exists())
                pytest.fail(f"{runs.count()} runs, statuses {list(runs.values_list('status', flat=True))}:\n{logs}")
            time.sleep(0.2)
    finally:
        beat.terminate()
        try:
            beat.wait(timeout=10)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait()

    succeeded = runs.filter(status=RunStatus.SUCCEEDED).first()
    assert succeeded.result == {"beat": True}
    assert succeeded.worker.startswith(f"{Tier.STANDARD.value}-")
    schedule.refresh_from_db()
    assert schedule.last_run in runs
