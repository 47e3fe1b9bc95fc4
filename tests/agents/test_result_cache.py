"""Submissions answered from the shared result cache (issue: the same input is never computed twice)."""

from agents.models import Agent
from caching.results import result_cache_get_many, result_cache_put
from tests.factories import StaffFactory, UserFactory

RUNS = "/api/v1/runs/"


def cache(agent: str, input: dict, result) -> None:
    row = Agent.objects.get(name=agent)
    result_cache_put(agent=agent, version=row.version, input=input, result=result, ttl=60)


def submit(api, body):
    return api.post(RUNS, body, format="json")


def test_a_cached_input_is_answered_at_once_without_a_message(transactional_db, api, published):
    cache("text_stats", {"text": "Hi.", "top": 10}, {"words": 1})

    response = submit(api, {"agent": "text_stats", "input": {"top": 10, "text": "Hi."}})

    assert response.status_code == 201
    run = response.json()
    assert (run["status"], run["cached"], run["result"]) == ("succeeded", True, {"words": 1})
    assert published == []


def test_any_user_gets_a_result_cached_for_another(transactional_db, api_for):
    cache("factorize", {"n": 15}, {"factors": [3, 5]})

    first = submit(api_for(UserFactory()), {"agent": "factorize", "input": {"n": 15}}).json()
    second = submit(api_for(UserFactory()), {"agent": "factorize", "input": {"n": 15}}).json()

    assert first["cached"] is True
    assert second["cached"] is True


def test_bypass_runs_the_agent_anyway(transactional_db, api, published):
    cache("factorize", {"n": 21}, {"factors": [3, 7]})

    run = submit(api, {"agent": "factorize", "input": {"n": 21}, "cache": "bypass"}).json()

    assert (run["status"], run["cached"]) == ("queued", False)
    assert len(published) == 1


def test_an_agent_that_is_not_cacheable_never_reads_the_cache(transactional_db, api):
    cache("echo", {"a": 1}, {"a": "stale"})

    run = submit(api, {"agent": "echo", "input": {"a": 1}}).json()

    assert run["status"] == "queued"


def test_a_new_agent_version_misses_the_old_entries(transactional_db, api):
    result_cache_put(agent="factorize", version="0", input={"n": 35}, result={"factors": [5, 7]}, ttl=60)

    run = submit(api, {"agent": "factorize", "input": {"n": 35}}).json()

    assert run["status"] == "queued"


def test_a_batch_is_answered_from_the_cache_item_by_item(transactional_db, api, published):
    cache("factorize", {"n": 6}, {"factors": [2, 3]})
    body = {"runs": [{"agent": "factorize", "input": {"n": 6}}, {"agent": "factorize", "input": {"n": 10}}]}

    runs = api.post(f"{RUNS}batch/", body, format="json").json()

    assert [run["cached"] for run in runs] == [True, False]
    assert published == [[runs[1]["id"]]]


def test_a_run_finished_by_a_worker_fills_the_cache_for_the_next_submission(transactional_db, workers, api):
    first = submit(api, {"agent": "factorize", "input": {"n": 9991}, "cache": "bypass"}).json()
    first = api.get(f"{RUNS}{first['id']}/", {"wait": 20}).json()

    second = submit(api, {"agent": "factorize", "input": {"n": 9991}}).json()

    assert first["status"] == "succeeded"
    assert (second["cached"], second["result"]) == (True, first["result"])


def test_the_admin_clear_cache_action_removes_the_agent_entries(transactional_db, client):
    cache("factorize", {"n": 77}, {"factors": [7, 11]})
    client.force_login(StaffFactory())
    agent = Agent.objects.get(name="factorize")

    response = client.post(
        "/admin/agents/agent/", {"action": "clear_cache", "_selected_action": [agent.pk]}, follow=True
    )

    assert response.status_code == 200
    assert result_cache_get_many([("factorize", agent.version, {"n": 77})]) == [None]
