from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from agentplatform.redis_client import redis_client
from agents.models import Agent, Run, RunStatus
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
        **changes,
    }
    if not data["enabled"]:
        del data["enabled"]  # an unticked checkbox is not posted
    return data


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
