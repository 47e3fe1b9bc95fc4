from rest_framework.test import APIClient

from agents.models import Agent


def test_the_agent_list_shows_every_registered_agent_with_its_tunables(api):
    agents = {agent["name"]: agent for agent in api.get("/api/v1/agents/").json()["results"]}

    assert {"echo", "sleep", "text_stats", "factorize"} <= set(agents)
    assert set(agents["sleep"]) == {
        "name", "version", "description", "tier", "sla_seconds", "soft_time_limit", "time_limit",
        "max_retries", "cache_ttl", "enabled", "input_schema",
    }  # fmt: skip
    assert agents["sleep"]["input_schema"]["properties"]["seconds"]["type"] == "number"
    assert agents["factorize"]["tier"] == "batch"
    assert agents["factorize"]["cache_ttl"] > 0


def test_the_agent_list_reflects_tuning_in_the_database(api):
    Agent.objects.filter(name="echo").update(tier="critical", sla_seconds=2, enabled=False)

    echo = api.get("/api/v1/agents/echo/").json()

    assert (echo["tier"], echo["sla_seconds"], echo["enabled"]) == ("critical", 2, False)


def test_an_agent_no_longer_declared_in_code_is_not_listed(api):
    Agent.objects.create(name="gone", version="1", sla_seconds=1, soft_time_limit=1, time_limit=1, registered=False)

    assert api.get("/api/v1/agents/gone/").status_code == 404


def test_the_agent_list_needs_credentials(db):
    assert APIClient().get("/api/v1/agents/").status_code == 401


def test_the_openapi_schema_and_docs_are_served(db):
    client = APIClient()

    schema = client.get("/api/schema/", {"format": "json"})
    docs = client.get("/api/docs/")

    assert schema.status_code == 200
    assert "/api/v1/runs/" in schema.json()["paths"]
    assert docs.status_code == 200
