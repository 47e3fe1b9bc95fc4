"""The runs API without workers: submission, validation, access, listing, cancelling queued runs."""

import json
import uuid

import pytest
from rest_framework.test import APIClient

from agents.models import Agent, Run, RunStatus
from tests.factories import StaffFactory, UserFactory

RUNS = "/api/v1/runs/"


def submit(client, body, **kwargs):
    return client.post(RUNS, body, format="json", **kwargs)


def test_submitting_a_run_answers_201_with_the_queued_run(api):
    response = submit(api, {"agent": "echo", "input": {"hello": "world"}})

    assert response.status_code == 201
    run = response.json()
    assert run["agent"] == "echo"
    assert run["status"] == "queued"
    assert run["tier"] == "standard"
    assert run["input"] == {"hello": "world"}
    assert run["attempts"] == 0
    assert Run.objects.filter(pk=run["id"], submitted_by=api.user).exists()


def test_a_run_shows_every_documented_field(api):
    run = submit(api, {"agent": "echo", "input": {}}).json()

    assert set(run) >= {
        "id", "agent", "agent_version", "tier", "status", "input", "result", "error", "attempts",
        "submitted_at", "started_at", "finished_at", "queue_wait_ms", "run_ms", "sla_seconds", "sla_met",
    }  # fmt: skip
    uuid.UUID(run["id"])


def test_the_tier_can_be_chosen_per_run(api):
    run = submit(api, {"agent": "echo", "input": {}, "tier": "batch"}).json()

    assert run["tier"] == "batch"


def test_a_run_records_the_agent_sla_and_version_at_submission(api):
    Agent.objects.filter(name="echo").update(sla_seconds=7)

    run = submit(api, {"agent": "echo", "input": {}}).json()

    assert run["sla_seconds"] == 7
    assert run["agent_version"] == Agent.objects.get(name="echo").version


def test_input_is_stored_as_validated_by_the_agent_schema(api):
    run = submit(api, {"agent": "text_stats", "input": {"text": "One. Two."}}).json()

    assert run["input"] == {"text": "One. Two.", "top": 10}


def test_the_same_idempotency_key_returns_the_first_run_with_200(api):
    first = submit(api, {"agent": "echo", "input": {"n": 1}, "idempotency_key": "k-1"})
    second = submit(api, {"agent": "echo", "input": {"n": 1}, "idempotency_key": "k-1"})

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert Run.objects.count() == 1


def test_idempotency_keys_are_per_user(api, api_for):
    other = api_for(UserFactory())

    first = submit(api, {"agent": "echo", "input": {}, "idempotency_key": "shared"})
    second = submit(other, {"agent": "echo", "input": {}, "idempotency_key": "shared"})

    assert second.status_code == 201
    assert second.json()["id"] != first.json()["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"agent": "no-such-agent", "input": {}}, "agent"),
        ({"agent": "echo"}, "input"),
        ({"input": {}}, "agent"),
        ({"agent": "echo", "input": [1, 2]}, "input"),
        ({"agent": "echo", "input": "text"}, "input"),
        ({"agent": "sleep", "input": {"seconds": "long"}}, "input"),
        ({"agent": "sleep", "input": {}}, "input"),
        ({"agent": "sleep", "input": {"seconds": -1}}, "input"),
        ({"agent": "echo", "input": {}, "tier": "urgent"}, "tier"),
        ({"agent": "echo", "input": {}, "idempotency_key": "k" * 201}, "idempotency_key"),
    ],
    ids=[
        "unknown-agent", "missing-input", "missing-agent", "input-list", "input-string", "input-wrong-type",
        "input-missing-field", "input-out-of-range", "unknown-tier", "key-too-long",
    ],
)  # fmt: skip
def test_bad_input_answers_400_naming_the_field_and_creates_nothing(api, body, field):
    response = submit(api, body)

    assert response.status_code == 400
    assert field in response.json()
    assert not Run.objects.exists()


def test_schema_errors_name_the_path_inside_the_input(api):
    response = submit(api, {"agent": "sleep", "input": {"seconds": "long"}})

    assert "seconds" in response.json()["input"]


def test_a_disabled_agent_refuses_runs(api):
    Agent.objects.filter(name="echo").update(enabled=False)

    response = submit(api, {"agent": "echo", "input": {}})

    assert response.status_code == 400
    assert "disabled" in response.json()["agent"][0]
    assert not Run.objects.exists()


def test_a_body_that_is_not_a_json_object_answers_400(api):
    response = api.post(RUNS, json.dumps([{"agent": "echo", "input": {}}]), content_type="application/json")

    assert response.status_code == 400
    assert not Run.objects.exists()


def test_malformed_json_answers_400(api):
    response = api.post(RUNS, '{"agent": "echo", "input": {', content_type="application/json")

    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]
    assert not Run.objects.exists()


def test_an_input_over_the_size_limit_answers_413_naming_the_input(api, settings):
    settings.RUN_MAX_INPUT_BYTES = 1000

    response = submit(api, {"agent": "echo", "input": {"blob": "x" * 1200}})

    assert response.status_code == 413
    assert "limit" in response.json()["input"][0]
    assert not Run.objects.exists()


def test_a_body_over_the_size_limit_answers_413_before_parsing(api, settings):
    settings.RUN_MAX_INPUT_BYTES = 1000

    response = api.post(RUNS, "x" * 50_000, content_type="application/json")

    assert response.status_code == 413
    assert not Run.objects.exists()


def test_a_request_without_credentials_answers_401(db):
    response = submit(APIClient(), {"agent": "echo", "input": {}})

    assert response.status_code == 401
    assert not Run.objects.exists()


def test_a_wrong_token_answers_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")

    assert client.get(RUNS).status_code == 401


def test_session_authentication_works_for_the_browsable_api(user):
    client = APIClient()
    client.force_login(user)

    assert client.get(RUNS).status_code == 200


def test_a_user_cannot_see_another_users_run(api, api_for):
    run_id = submit(api, {"agent": "echo", "input": {}}).json()["id"]
    other = api_for(UserFactory())

    assert other.get(f"{RUNS}{run_id}/").status_code == 404
    assert other.get(f"{RUNS}{run_id}/?wait=1").status_code == 404
    assert other.post(f"{RUNS}{run_id}/cancel/").status_code == 404
    assert Run.objects.get(pk=run_id).status == RunStatus.QUEUED


def test_a_user_lists_only_their_own_runs(api, api_for):
    submit(api, {"agent": "echo", "input": {}})
    other = api_for(UserFactory())
    submit(other, {"agent": "echo", "input": {}})

    listed = api.get(RUNS).json()

    assert listed["count"] == 1
    assert listed["results"][0]["agent"] == "echo"


def test_staff_see_every_run(api, api_for):
    run_id = submit(api, {"agent": "echo", "input": {}}).json()["id"]
    staff = api_for(StaffFactory())

    assert staff.get(f"{RUNS}{run_id}/").status_code == 200
    assert staff.get(RUNS).json()["count"] == 1


def test_the_run_list_is_newest_first_and_paginated(api, settings):
    ids = [submit(api, {"agent": "echo", "input": {"n": n}}).json()["id"] for n in range(3)]

    first = api.get(RUNS, {"page_size": 2}).json()
    second = api.get(first["next"]).json()

    assert first["count"] == 3
    assert [run["id"] for run in first["results"] + second["results"]] == ids[::-1]


@pytest.mark.parametrize(
    ("query", "expected"),
    [({"agent": "sleep"}, 1), ({"tier": "batch"}, 1), ({"status": "queued"}, 2), ({"status": "failed"}, 0)],
)
def test_the_run_list_filters_by_agent_status_and_tier(api, query, expected):
    submit(api, {"agent": "echo", "input": {}, "tier": "batch"})
    submit(api, {"agent": "sleep", "input": {"seconds": 1}})

    assert api.get(RUNS, query).json()["count"] == expected


def test_an_unknown_status_filter_answers_400(api):
    response = api.get(RUNS, {"status": "sleeping"})

    assert response.status_code == 400
    assert "status" in response.json()


def test_getting_a_run_without_wait_answers_at_once(api):
    run_id = submit(api, {"agent": "echo", "input": {}}).json()["id"]

    response = api.get(f"{RUNS}{run_id}/")

    assert response.status_code == 200
    assert response.json()["status"] == "queued"


@pytest.mark.parametrize("wait", ["31", "-1", "soon"])
def test_a_wait_outside_0_to_30_seconds_answers_400(api, wait):
    run_id = submit(api, {"agent": "echo", "input": {}}).json()["id"]

    response = api.get(f"{RUNS}{run_id}/", {"wait": wait})

    assert response.status_code == 400
    assert "wait" in response.json()


def test_an_unknown_run_answers_404(api):
    assert api.get(f"{RUNS}{uuid.uuid4()}/").status_code == 404


def test_cancelling_a_queued_run_records_it_cancelled(api):
    run_id = submit(api, {"agent": "echo", "input": {}}).json()["id"]

    response = api.post(f"{RUNS}{run_id}/cancel/")

    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    run = Run.objects.get(pk=run_id)
    assert run.status == RunStatus.CANCELLED
    assert run.finished_at is not None


def test_cancelling_a_finished_run_answers_409_and_changes_nothing(api):
    run_id = submit(api, {"agent": "echo", "input": {}}).json()["id"]
    Run.objects.filter(pk=run_id).update(status=RunStatus.SUCCEEDED, result={"ok": True})

    response = api.post(f"{RUNS}{run_id}/cancel/")

    assert response.status_code == 409
    assert Run.objects.get(pk=run_id).status == RunStatus.SUCCEEDED
