"""An idempotency key names one request: repeating it answers the first run, reusing it for another is refused."""

import pytest

from agents.models import Run

RUNS = "/api/v1/runs/"
BATCH = "/api/v1/runs/batch/"


def submit(client, **fields):
    return client.post(RUNS, {"agent": "echo", "input": {"n": 1}, "idempotency_key": "k-1", **fields}, format="json")


def test_repeating_a_request_with_its_key_answers_the_first_run_with_200(api):
    first = submit(api, tier="batch")
    again = submit(api, tier="batch")

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_a_repeat_that_leaves_the_tier_to_the_agent_answers_the_first_run(api):
    first = submit(api, tier="batch")

    again = submit(api)

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]


@pytest.mark.parametrize(
    "changed",
    [{"input": {"n": 2}}, {"agent": "sleep", "input": {"seconds": 1}}, {"tier": "standard"}],
    ids=["input", "agent", "tier"],
)
def test_reusing_a_key_for_another_request_answers_409_naming_the_first_run(api, changed):
    first = submit(api, tier="batch").json()

    response = submit(api, **{"tier": "batch", **changed})

    assert response.status_code == 409
    body = response.json()
    assert body["run"] == first["id"]
    assert first["id"] in body["idempotency_key"][0]
    assert Run.objects.count() == 1


def test_a_batch_item_reusing_a_key_for_another_request_answers_409_naming_the_item_and_run(api):
    first = submit(api).json()
    runs = [{"agent": "echo", "input": {"n": 5}}, {"agent": "echo", "input": {"n": 2}, "idempotency_key": "k-1"}]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 409
    assert response.json()["runs"]["1"]["run"] == first["id"]
    assert Run.objects.count() == 1


def test_two_batch_items_sharing_a_key_for_different_requests_answer_400_naming_both(api):
    runs = [
        {"agent": "echo", "input": {"n": 1}, "idempotency_key": "twin"},
        {"agent": "echo", "input": {}},
        {"agent": "echo", "input": {"n": 2}, "idempotency_key": "twin"},
    ]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 400
    assert set(response.json()["runs"]) == {"0", "2"}
    assert "idempotency_key" in response.json()["runs"]["2"]
    assert not Run.objects.exists()


def test_two_identical_batch_items_sharing_a_key_make_one_run(api):
    item = {"agent": "echo", "input": {"n": 1}, "idempotency_key": "twin"}

    response = api.post(BATCH, {"runs": [item, item]}, format="json")

    assert response.status_code == 201
    first, second = response.json()
    assert first["id"] == second["id"]
    assert Run.objects.count() == 1
