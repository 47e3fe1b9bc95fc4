import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from agentplatform.redis_client import redis_client
from agents.admin import RUN_FIELDS_SHOWN_AS
from agents.models import Agent, Run, RunStatus
from agents.retention import retention_last_purge_key, runs_purge
from agents.topics import topic_message_dispatch, topic_stats_key
from scheduling.tiers import Tier
from tests.factories import RunFactory, UserFactory

AGENTS_URL = reverse("admin:agents_agent_changelist")
RUNS_URL = reverse("admin:agents_run_changelist")


@pytest.fixture
def echo(db) -> Agent:
    return Agent.objects.get(name="echo")


def agent_url(agent: Agent) -> str:
    return reverse("admin:agents_agent_change", args=[agent.pk])


def run_url(run: Run) -> str:
    return reverse("admin:agents_run_change", args=[run.pk])


def tunables(agent: Agent, **changes) -> dict:
    """The agent's change form as a browser would post it, with `changes` applied."""
    data = {
        "tier": agent.tier,
        "sla_seconds": agent.sla_seconds,
        "soft_time_limit": agent.soft_time_limit,
        "time_limit": agent.time_limit,
        "max_retries": agent.max_retries,
        "cache_ttl": agent.cache_ttl,
        "enabled": agent.enabled,
        "backlog_limit": agent.backlog_limit,
        "concurrency_limit": agent.concurrency_limit,
        **changes,
    }
    if not data["enabled"]:
        del data["enabled"]  # an unticked checkbox is not posted
    return {field: "" if value is None else value for field, value in data.items()}  # an empty field posts ""


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


@pytest.mark.parametrize("query", [{}, {"tier": "critical"}, {"enabled__exact": "1"}, {"registered__exact": "0"}])
def test_agent_changelist_renders_with_each_filter(staff_client, query):
    response = staff_client.get(AGENTS_URL, query)

    assert response.status_code == 200


def test_agent_change_form_shows_input_schema_pretty_printed(staff_client, echo):
    response = staff_client.get(agent_url(echo))

    assert response.status_code == 200
    assert "<pre>{\n  &quot;additionalProperties&quot;: true," in response.content.decode()


def test_agent_change_form_shows_its_topics_with_the_dispatchers_counts(staff_client):
    listener = Agent.objects.get(name="test.listener")
    redis_client().delete(topic_stats_key())
    topic_message_dispatch("test.orders", b"not json", agents=[listener.name])

    response = staff_client.get(agent_url(listener))

    assert "<code>test.orders</code>: 1 received, 0 runs submitted, 1 bad, 0 refused" in response.content.decode()


def test_editing_agent_tunables_persists(staff_client, echo):
    changes = {
        "tier": Tier.CRITICAL,
        "sla_seconds": 2.5,
        "soft_time_limit": 3,
        "time_limit": 4,
        "max_retries": 2,
        "cache_ttl": 600,
        "enabled": False,
        "backlog_limit": 50,
        "concurrency_limit": 3,
    }

    response = staff_client.post(agent_url(echo), tunables(echo, **changes))

    assert response.status_code == 302
    echo.refresh_from_db()
    assert {field: getattr(echo, field) for field in changes} == changes


def test_soft_limit_above_hard_limit_shows_field_error_and_leaves_agent_unchanged(staff_client, echo):
    before = Agent.objects.values().get(pk=echo.pk)

    response = staff_client.post(agent_url(echo), tunables(echo, soft_time_limit=30, time_limit=20, max_retries=3))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors == {"time_limit": ["Must not be below the soft time limit (30 s)."]}
    assert Agent.objects.values().get(pk=echo.pk) == before


def test_non_positive_sla_shows_field_error_and_leaves_agent_unchanged(staff_client, echo):
    before = Agent.objects.values().get(pk=echo.pk)

    response = staff_client.post(agent_url(echo), tunables(echo, sla_seconds=0))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {"sla_seconds": ["Must be more than 0 seconds."]}
    assert Agent.objects.values().get(pk=echo.pk) == before


def test_changelist_edits_tier_sla_and_enabled(staff_client, echo):
    data = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-0-id": echo.pk,
        "form-0-tier": Tier.BATCH,
        "form-0-sla_seconds": "7200",
        "_save": "Save",
    }

    response = staff_client.post(AGENTS_URL, data)

    assert response.status_code == 302
    echo.refresh_from_db()
    assert (echo.tier, echo.sla_seconds, echo.enabled) == (Tier.BATCH, 7200, False)


def test_changelist_refuses_non_positive_sla(staff_client, echo):
    data = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-0-id": echo.pk,
        "form-0-tier": echo.tier,
        "form-0-sla_seconds": "-1",
        "form-0-enabled": "on",
        "_save": "Save",
    }

    response = staff_client.post(AGENTS_URL, data)

    assert response.status_code == 200
    assert response.context["cl"].formset.errors == [{"sla_seconds": ["Must be more than 0 seconds."]}]
    assert Agent.objects.get(pk=echo.pk).sla_seconds == echo.sla_seconds


def test_code_owned_agent_fields_cannot_be_changed_by_post(staff_client, echo):
    code_owned = {"name": "renamed", "version": "99", "description": "changed", "input_schema": "{}", "registered": ""}

    response = staff_client.post(agent_url(echo), {**tunables(echo), **code_owned})

    assert response.status_code == 302
    agent = Agent.objects.get(pk=echo.pk)
    assert (agent.name, agent.version, agent.description, agent.input_schema, agent.registered) == (
        echo.name,
        echo.version,
        echo.description,
        echo.input_schema,
        True,
    )


def test_agent_add_page_is_forbidden(staff_client):
    assert staff_client.get(reverse("admin:agents_agent_add")).status_code == 403


def test_agent_delete_page_is_forbidden(staff_client, echo):
    assert staff_client.get(reverse("admin:agents_agent_delete", args=[echo.pk])).status_code == 403


@pytest.fixture
def run(db) -> Run:
    return RunFactory(tier=Tier.CRITICAL, status=RunStatus.SUCCEEDED, result={"text": "hello"})


def today_range() -> dict[str, str]:
    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    return {"submitted_at__gte": str(midnight), "submitted_at__lt": str(midnight + timedelta(days=1))}


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"status__exact": "succeeded"},
        {"tier__exact": "critical"},
        today_range(),
        {"submitted_at__year": str(timezone.localdate().year)},
    ],
)
def test_run_changelist_lists_the_run_with_each_filter(staff_client, run, query):
    response = staff_client.get(RUNS_URL, query)

    assert response.status_code == 200
    assert str(run.pk) in response.content.decode()


def test_run_changelist_filters_by_agent(staff_client, run):
    other = RunFactory(agent=Agent.objects.get(name="sleep"), input={"seconds": 0})

    response = staff_client.get(RUNS_URL, {"agent__id__exact": run.agent_id})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [run]
    assert str(other.pk) not in response.content.decode()


def test_run_changelist_lists_newest_first(staff_client):
    older, newer = RunFactory(), RunFactory()
    Run.objects.filter(pk=older.pk).update(submitted_at=timezone.now() - timedelta(hours=1))

    response = staff_client.get(RUNS_URL)

    assert list(response.context["cl"].result_list) == [newer, older]


def test_run_search_by_id_finds_the_run(staff_client, run):
    RunFactory()

    response = staff_client.get(RUNS_URL, {"q": str(run.pk)})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [run]


def test_run_search_with_a_term_that_is_not_an_id_finds_nothing(staff_client, run):
    response = staff_client.get(RUNS_URL, {"q": "not-a-uuid"})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []


def test_run_detail_shows_input_result_and_error_traceback(staff_client):
    run = RunFactory(
        input={"text": "<b>hi</b>"},
        status=RunStatus.FAILED,
        result={"partial": 1},
        error={"type": "ValueError", "message": "bad", "traceback": 'Traceback:\n  File "x.py"\nValueError: bad\n'},
    )

    content = staff_client.get(run_url(run)).content.decode()

    assert "<pre>{\n  &quot;text&quot;: &quot;&lt;b&gt;hi&lt;/b&gt;&quot;\n}</pre>" in content
    assert "<pre>{\n  &quot;partial&quot;: 1\n}</pre>" in content
    error = "<pre>{\n  &quot;message&quot;: &quot;bad&quot;,\n  &quot;type&quot;: &quot;ValueError&quot;\n}</pre>"
    assert error in content
    assert "<pre>Traceback:\n  File &quot;x.py&quot;\nValueError: bad\n</pre>" in content


def test_run_detail_cannot_be_changed(staff_client, run):
    response = staff_client.post(run_url(run), {"status": RunStatus.QUEUED, "input": "{}"})

    assert response.status_code == 403
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED


def test_run_add_page_is_forbidden(staff_client):
    assert staff_client.get(reverse("admin:agents_run_add")).status_code == 403


def test_cancel_action_cancels_queued_runs_and_skips_finished_ones(staff_client):
    queued = RunFactory.create_batch(2)
    finished = RunFactory(status=RunStatus.SUCCEEDED)
    selected = [run.pk for run in [*queued, finished]]

    response = staff_client.post(RUNS_URL, {"action": "cancel_runs", "_selected_action": selected})

    assert response.status_code == 302
    assert messages_of(response) == ["Cancelled 2 runs; skipped 1 that had already finished."]
    assert set(Run.objects.filter(pk__in=selected).values_list("pk", "status")) == {
        (queued[0].pk, RunStatus.CANCELLED),
        (queued[1].pk, RunStatus.CANCELLED),
        (finished.pk, RunStatus.SUCCEEDED),
    }


def test_run_again_submits_new_queued_runs_as_the_staff_user(staff_client, staff):
    originals = [
        RunFactory(tier=Tier.CRITICAL, input={"n": 1}, status=RunStatus.SUCCEEDED),
        RunFactory(tier=Tier.BATCH, input={"n": 2}, status=RunStatus.FAILED),
    ]

    response = staff_client.post(RUNS_URL, {"action": "run_again", "_selected_action": [r.pk for r in originals]})

    assert response.status_code == 302
    assert messages_of(response) == ["Submitted 2 new runs."]
    new_runs = Run.objects.exclude(pk__in=[run.pk for run in originals])
    assert list(
        new_runs.order_by("input__n").values_list("agent__name", "input", "tier", "status", "submitted_by")
    ) == [
        ("echo", {"n": 1}, Tier.CRITICAL, RunStatus.QUEUED, staff.pk),
        ("echo", {"n": 2}, Tier.BATCH, RunStatus.QUEUED, staff.pk),
    ]


def test_run_again_reports_runs_of_a_disabled_agent_as_refused(staff_client, run):
    Agent.objects.filter(name="echo").update(enabled=False)

    response = staff_client.post(RUNS_URL, {"action": "run_again", "_selected_action": [run.pk]})

    assert messages_of(response) == [
        "Submitted 0 new runs.",
        f"Refused 1: {run.pk} (Agent 'echo' is disabled.)",
    ]
    assert Run.objects.count() == 1


def test_view_only_staff_cannot_use_run_actions(client, run):
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(viewer)
    queued = RunFactory()

    listing = client.get(RUNS_URL)
    response = client.post(RUNS_URL, {"action": "cancel_runs", "_selected_action": [queued.pk]})

    assert listing.status_code == 200
    assert "cancel_runs" not in listing.content.decode()
    assert response.status_code == 200  # the admin ignores an action it does not offer
    assert Run.objects.get(pk=queued.pk).status == RunStatus.QUEUED


def test_the_agent_page_offers_every_tunable_the_readme_names(staff_client, echo):
    form = staff_client.get(agent_url(echo)).context["adminform"].form

    assert set(form.fields) == {
        "tier", "sla_seconds", "soft_time_limit", "time_limit", "max_retries", "cache_ttl", "enabled",
        "backlog_limit", "concurrency_limit",
    }  # fmt: skip


def test_emptying_an_agents_own_limits_sets_them_back_to_none(staff_client, echo):
    Agent.objects.filter(pk=echo.pk).update(backlog_limit=10, concurrency_limit=2)
    echo.refresh_from_db()

    response = staff_client.post(agent_url(echo), tunables(echo, backlog_limit="", concurrency_limit=""))

    assert response.status_code == 302
    echo.refresh_from_db()
    assert (echo.backlog_limit, echo.concurrency_limit) == (None, None)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("backlog_limit", "Must be at least 1; leave it empty for the tier's limit."),
        ("concurrency_limit", "Must be at least 1; leave it empty for no limit."),
    ],
)
def test_a_limit_of_zero_shows_a_field_error_and_leaves_the_agent_unchanged(staff_client, echo, field, message):
    before = Agent.objects.values().get(pk=echo.pk)

    response = staff_client.post(agent_url(echo), tunables(echo, **{field: 0}))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {field: [message]}
    assert Agent.objects.values().get(pk=echo.pk) == before


def test_a_backlog_limit_set_in_the_admin_refuses_submissions_beyond_it(staff_client, echo, api):
    staff_client.post(agent_url(echo), tunables(echo, backlog_limit=1))

    first = api.post("/api/v1/runs/", {"agent": "echo", "input": {"n": 1}}, format="json")
    second = api.post("/api/v1/runs/", {"agent": "echo", "input": {"n": 2}}, format="json")

    assert (first.status_code, second.status_code) == (201, 429)
    assert "agent 'echo' backlog is 1 runs; the limit is 1." in second.json()["detail"]


def test_the_run_page_shows_every_field_of_the_run(staff_client):
    leader = RunFactory(finished=True)
    run = RunFactory(
        follows=leader,
        parent=leader,
        expires_at=timezone.now() + timedelta(hours=1),
        escalate_at=timezone.now() + timedelta(minutes=1),
        sla_miss="queue_wait",
    )

    html = staff_client.get(run_url(run)).content.decode()

    for field in Run._meta.concrete_fields:
        shown_as = RUN_FIELDS_SHOWN_AS.get(field.name, field.name)
        assert f'class="form-row field-{shown_as}' in html, f"{field.name} is not on the run page"
    assert f'<a href="{run_url(leader)}">{leader.pk}</a>' in html  # follows and parent link to that run


def test_the_run_page_shows_the_error_of_each_attempt_and_the_agents_log(staff_client):
    run = RunFactory(
        status=RunStatus.FAILED,
        attempts=2,
        error={"type": "ValueError", "message": "second", "traceback": "Traceback: second"},
        attempt_errors=[
            {"attempt": 1, "at": "2026-01-01T00:00:00+00:00", "type": "KeyError", "message": "<first>",
             "traceback": "Traceback: first"},
            {"attempt": 2, "at": "2026-01-01T00:00:05+00:00", "type": "ValueError", "message": "second",
             "traceback": "Traceback: second"},
        ],
        log="2026-01-01 00:00:00,000 INFO reading <input>\n--- attempt 2 ---\n2026-01-01 00:00:05,000 INFO again\n",
    )  # fmt: skip

    html = staff_client.get(run_url(run)).content.decode()

    assert "<td>1</td><td>2026-01-01T00:00:00+00:00</td><td><code>KeyError</code></td><td>&lt;first&gt;</td>" in html
    assert "<pre>Traceback: first</pre>" in html
    assert "<td><code>ValueError</code></td><td>second</td>" in html
    assert "INFO reading &lt;input&gt;\n--- attempt 2 ---\n" in html


def test_a_queued_runs_page_has_cancel_and_run_again_buttons(staff_client):
    run = RunFactory()

    html = staff_client.get(run_url(run)).content.decode()

    assert f'action="{reverse("admin:agents_run_cancel", args=[run.pk])}"' in html
    assert f'action="{reverse("admin:agents_run_run_again", args=[run.pk])}"' in html
    assert 'name="csrfmiddlewaretoken"' in html


def test_a_finished_runs_page_has_run_again_but_no_cancel(staff_client, run):
    html = staff_client.get(run_url(run)).content.decode()

    assert reverse("admin:agents_run_cancel", args=[run.pk]) not in html
    assert reverse("admin:agents_run_run_again", args=[run.pk]) in html


def test_view_only_staff_see_no_run_buttons_and_cannot_use_them(client, run):
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(viewer)
    queued = RunFactory()

    html = client.get(run_url(queued)).content.decode()
    response = client.post(reverse("admin:agents_run_cancel", args=[queued.pk]))

    assert "run-button" not in html
    assert response.status_code == 403
    assert Run.objects.get(pk=queued.pk).status == RunStatus.QUEUED


def test_the_cancel_button_cancels_the_run(staff_client):
    run = RunFactory()

    response = staff_client.post(reverse("admin:agents_run_cancel", args=[run.pk]))

    assert response.status_code == 302
    assert response["Location"] == run_url(run)
    assert messages_of(response) == [f"Cancelled run {run.pk}."]
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED


def test_the_cancel_button_on_a_finished_run_says_so(staff_client, run):
    response = staff_client.post(reverse("admin:agents_run_cancel", args=[run.pk]))

    assert response.status_code == 302
    assert messages_of(response) == [
        f"Run {run.pk} was not cancelled: the run already finished (succeeded) and cannot be cancelled."
    ]
    assert Run.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED


def test_the_run_buttons_answer_only_post(staff_client, run):
    for name in ("admin:agents_run_cancel", "admin:agents_run_run_again"):
        assert staff_client.get(reverse(name, args=[run.pk])).status_code == 405
    assert Run.objects.count() == 1


def test_a_run_button_for_a_run_that_does_not_exist_says_so(staff_client, db):
    missing = uuid.uuid4()

    response = staff_client.post(reverse("admin:agents_run_cancel", args=[missing]))

    assert response["Location"] == RUNS_URL
    assert messages_of(response) == [f"No run has the id '{missing}'."]


def test_the_run_again_button_submits_a_new_run_and_opens_it(staff_client, staff, run):
    response = staff_client.post(reverse("admin:agents_run_run_again", args=[run.pk]))

    new = Run.objects.exclude(pk=run.pk).get()
    assert response.status_code == 302
    assert response["Location"] == run_url(new)
    assert messages_of(response) == [f"Submitted run {new.pk}, a new run of {run.pk}."]
    assert (new.input, new.tier, new.status, new.submitted_by_id) == (run.input, run.tier, RunStatus.QUEUED, staff.pk)


def test_the_run_again_button_refused_by_admission_shows_why_instead_of_an_error(staff_client, run, settings):
    settings.TIER_BACKLOG_LIMITS = {**settings.TIER_BACKLOG_LIMITS, "critical": 0}

    response = staff_client.post(reverse("admin:agents_run_run_again", args=[run.pk]), follow=True)

    assert response.status_code == 200
    assert messages_of(response) == [f"Could not run again run {run.pk}: critical backlog is 0 runs; the limit is 0."]
    assert Run.objects.count() == 1


def test_the_run_again_action_reports_runs_refused_by_admission(staff_client, run, settings):
    settings.TIER_BACKLOG_LIMITS = {**settings.TIER_BACKLOG_LIMITS, "critical": 0}

    response = staff_client.post(RUNS_URL, {"action": "run_again", "_selected_action": [run.pk]})

    assert response.status_code == 302
    assert messages_of(response) == [
        "Submitted 0 new runs.",
        f"Refused 1: {run.pk} (critical backlog is 0 runs; the limit is 0.)",
    ]


@pytest.fixture
def redis_unreachable(settings) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there


@pytest.mark.usefixtures("redis_unreachable")
def test_the_cancel_button_without_redis_still_cancels_the_run(staff_client):
    run = RunFactory()

    response = staff_client.post(reverse("admin:agents_run_cancel", args=[run.pk]), follow=True)

    assert response.status_code == 200
    assert messages_of(response) == [f"Cancelled run {run.pk}."]
    assert Run.objects.get(pk=run.pk).status == RunStatus.CANCELLED


@pytest.mark.usefixtures("redis_unreachable")
def test_the_clear_cache_action_without_redis_shows_a_message_not_an_error_page(staff_client, echo):
    response = staff_client.post(AGENTS_URL, {"action": "clear_cache", "_selected_action": [echo.pk]})

    assert response.status_code == 302
    assert messages_of(response) == ["Could not clear cached results: Redis does not answer."]


def test_the_runs_list_says_how_long_runs_are_kept_and_when_they_were_last_purged(staff_client, settings):
    settings.RUN_RETENTION_DAYS = 30
    redis_client().delete(retention_last_purge_key())
    RunFactory(finished=True, submitted_at=timezone.now() - timedelta(days=40))
    RunFactory(finished=True, submitted_at=timezone.now() - timedelta(days=50))
    report = runs_purge()

    html = staff_client.get(RUNS_URL).content.decode()

    at = report.at.strftime("%Y-%m-%d %H:%M:%S")
    assert f"Finished runs are deleted 30 days after they finished. Last purge: {at} UTC, 2 deleted." in html


def test_the_runs_list_says_runs_are_kept_forever_with_a_retention_of_zero(staff_client, settings):
    settings.RUN_RETENTION_DAYS = 0

    assert "Finished runs are kept forever" in staff_client.get(RUNS_URL).content.decode()
