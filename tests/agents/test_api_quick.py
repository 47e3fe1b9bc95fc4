def test_submit_echo_creates_a_queued_run(api):
    response = api.post("/api/v1/runs/", {"agent": "echo", "input": {"a": 1}}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "queued"


def test_echo_runs_on_a_worker(transactional_db, workers, api):
    response = api.post("/api/v1/runs/", {"agent": "echo", "input": {"a": 1}}, format="json")
    run = api.get(f"/api/v1/runs/{response.json()['id']}/?wait=10").json()
    assert run["status"] == "succeeded", run
    assert run["result"] == {"a": 1}
