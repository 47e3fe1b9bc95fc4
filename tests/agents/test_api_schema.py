"""The OpenAPI schema and the API agree: generated requests to every endpoint never answer 5xx, and
every answer (status, content type, headers, body) is one the schema documents."""

import hypothesis
import pytest
import schemathesis
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agentplatform.wsgi import application
from tests.factories import StaffFactory

SCHEMA_URL = "/api/schema/?format=json"
# Generated requests per endpoint: enough to reach each error answer, few enough for ~30 s in all.
EXAMPLES_PER_ENDPOINT = 25
# What "matching the schema" means here. Checks about which requests should be accepted are left out:
# a schema cannot say which agents exist or what each one's input needs.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def schema_of(app) -> "schemathesis.schemas.BaseSchema":
    """The schema as the app serves it, read when the tests are collected (one test per endpoint)."""
    config = schemathesis.Config.from_dict(
        {
            "generation": {"mode": "positive", "deterministic": True, "max-examples": EXAMPLES_PER_ENDPOINT},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            # The documented examples, then generated data; the coverage phase's boundary values would
            # triple the requests.
            "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_wsgi(SCHEMA_URL, app, config=config)


schema = schema_of(application)


@pytest.fixture
def staff_token(transactional_db) -> str:
    return Token.objects.create(user=StaffFactory()).key


@pytest.mark.slow
@schema.parametrize()
# The one staff token serves every generated request; each request commits (the WSGI app is called
# as a server would call it), and the tables are emptied once the endpoint's requests are done.
@hypothesis.settings(
    deadline=None, database=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)
def test_every_endpoint_answers_as_its_schema_says(case, staff_token):
    response = case.call_and_validate(headers={"Authorization": f"Token {staff_token}"})

    assert response.status_code != 401, "the requests must reach the endpoint, not stop at authentication"


@pytest.fixture
def document(db) -> dict:
    return APIClient().get(SCHEMA_URL).json()


def test_the_schema_documents_every_error_a_submission_can_answer(document):
    for path in ("/api/v1/runs/", "/api/v1/runs/batch/"):
        responses = document["paths"][path]["post"]["responses"]
        assert {"400", "401", "403", "409", "413", "429"} <= set(responses), path
        assert "Retry-After" in responses["429"]["headers"]


def test_the_schema_says_a_submission_is_an_object_of_known_fields_with_an_object_input(document):
    submit = document["components"]["schemas"]["RunSubmit"]

    assert submit["additionalProperties"] is False
    assert submit["properties"]["input"]["type"] == "object"
    assert submit["properties"]["expires_in"]["maximum"] == 30 * 86400


def test_the_schema_says_a_batch_holds_at_least_one_run(document, settings):
    runs = document["components"]["schemas"]["RunBatch"]["properties"]["runs"]

    assert (runs["minItems"], runs["maxItems"]) == (1, settings.RUN_BATCH_MAX_ITEMS)


def test_the_schema_admits_an_empty_sla_miss(document):
    choices = document["components"]["schemas"]["Run"]["properties"]["sla_miss"]["oneOf"]
    names = [choice["$ref"].rsplit("/", 1)[1] for choice in choices]

    assert any("" in document["components"]["schemas"][name]["enum"] for name in names)


def test_the_schema_states_the_window_pattern(document):
    (window,) = document["paths"]["/api/v1/stats/"]["get"]["parameters"]

    assert window["schema"]["pattern"] == "^[0-9]+[smhd]$"
    assert window["schema"]["minLength"] == 1
