"""Submitting to the critical tier is a permission: staff have it, others are granted it in the admin."""

import pytest
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from agents.models import Agent, Run
from agents.runs.submit import RunRequest, run_submit
from tests.factories import UserFactory

RUNS = "/api/v1/runs/"
BATCH = "/api/v1/runs/batch/"


@pytest.fixture
def submit_critical(db) -> Permission:
    return Permission.objects.get(content_type__app_label="agents", codename="submit_critical")


def submit(client, **fields):
    return client.post(RUNS, {"agent": "echo", "input": {}, **fields}, format="json")


def test_the_permission_is_declared_for_the_admin_to_grant(submit_critical):
    assert submit_critical.name == "Can submit runs to the critical tier"


def test_a_user_without_the_permission_gets_403_naming_it_and_nothing_is_stored(api):
    response = submit(api, tier="critical")

    assert response.status_code == 403
    assert "agents.submit_critical" in response.json()["tier"][0]
    assert not Run.objects.exists()


def test_a_user_granted_the_permission_submits_to_critical(api, submit_critical):
    api.user.user_permissions.add(submit_critical)

    response = submit(api, tier="critical")

    assert response.status_code == 201
    assert response.json()["tier"] == "critical"


def test_the_permission_granted_to_a_group_counts_for_its_members(api, submit_critical):
    group = Group.objects.create(name="operators")
    group.permissions.add(submit_critical)
    api.user.groups.add(group)

    assert submit(api, tier="critical").status_code == 201


def test_staff_submit_to_critical_without_being_granted_it(db, api_for):
    staff = api_for(UserFactory(is_staff=True))

    assert submit(staff, tier="critical").status_code == 201


def test_a_session_user_granted_the_permission_submits_to_critical(user, submit_critical):
    user.user_permissions.add(submit_critical)
    client = APIClient()
    client.force_login(user)

    assert submit(client, tier="critical").status_code == 201


def test_a_batch_item_asking_for_critical_without_the_permission_refuses_the_batch_naming_it(api):
    runs = [{"agent": "echo", "input": {}}, {"agent": "echo", "input": {}, "tier": "critical"}]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 403
    assert "agents.submit_critical" in response.json()["runs"]["1"]["tier"][0]
    assert not Run.objects.exists()


def test_a_run_of_a_critical_agent_is_placed_on_standard_for_a_user_without_the_permission(api):
    Agent.objects.filter(name="echo").update(tier="critical")

    response = submit(api)

    assert response.status_code == 201
    assert response.json()["tier"] == "standard"


def test_a_run_of_a_critical_agent_stays_critical_for_a_user_with_the_permission(api, submit_critical):
    Agent.objects.filter(name="echo").update(tier="critical")
    api.user.user_permissions.add(submit_critical)

    assert submit(api).json()["tier"] == "critical"


def test_the_permission_is_read_with_the_token_at_no_extra_query(api, submit_critical):
    api.user.user_permissions.add(submit_critical)
    submit(api, tier="critical")  # the first request warms per-process caches

    with CaptureQueriesContext(connection) as queries:
        response = submit(api, tier="critical", input={"n": 1})

    assert response.status_code == 201
    # token (with the permission), agent, insert
    assert len(queries) <= 3, [query["sql"][:60] for query in queries]


def test_code_submitting_for_a_user_keeps_the_tier_the_code_chose(user):
    """An agent's child run, a schedule or a topic's reaction: the code, not the user, asked for critical."""
    run, _ = run_submit(user=user, request=RunRequest(agent="echo", input={}, tier="critical"))

    assert run.tier == "critical"
