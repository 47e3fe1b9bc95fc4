from agents.models import Run

BATCH = "/api/v1/runs/batch/"


def test_a_batch_creates_every_run_and_answers_201_with_them_in_order(api):
    runs = [{"agent": "echo", "input": {"n": n}} for n in range(5)]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 201
    assert [run["input"]["n"] for run in response.json()] == list(range(5))
    assert Run.objects.count() == 5


def test_one_invalid_item_rejects_the_whole_batch_naming_its_index(api):
    runs = [
        {"agent": "echo", "input": {}},
        {"agent": "sleep", "input": {"seconds": "x"}},
        {"agent": "echo", "input": {}},
    ]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 400
    assert "seconds" in response.json()["runs"]["1"]["input"]
    assert not Run.objects.exists()


def test_an_unknown_agent_in_a_batch_names_its_index(api):
    runs = [{"agent": "echo", "input": {}}, {"agent": "nope", "input": {}}]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 400
    assert "agent" in response.json()["runs"]["1"]
    assert not Run.objects.exists()


def test_a_batch_over_the_item_limit_is_refused(api, settings):
    runs = [{"agent": "echo", "input": {}}] * (settings.RUN_BATCH_MAX_ITEMS + 1)

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 400
    assert "runs" in response.json()
    assert not Run.objects.exists()


def test_an_empty_batch_is_refused(api):
    response = api.post(BATCH, {"runs": []}, format="json")

    assert response.status_code == 400
    assert "runs" in response.json()


def test_a_batch_of_1000_runs_is_accepted(api):
    runs = [{"agent": "echo", "input": {"n": n}} for n in range(1000)]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 201
    assert Run.objects.count() == 1000


def test_idempotency_keys_in_a_batch_return_existing_runs(api):
    first = api.post("/api/v1/runs/", {"agent": "echo", "input": {}, "idempotency_key": "a"}, format="json").json()
    runs = [
        {"agent": "echo", "input": {}, "idempotency_key": "a"},
        {"agent": "echo", "input": {}, "idempotency_key": "b"},
    ]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.json()[0]["id"] == first["id"]
    assert Run.objects.count() == 2
