"""Inputs that once answered 500 (or were quietly ignored) answer 400 or 413 naming the problem, and store nothing."""

import json

import pytest
from rest_framework.test import APIClient

from agents.errors import RunRejected
from agents.models import Run
from agents.runs.submit import RunRequest, run_submit
from tests.factories import UserFactory

RUNS = "/api/v1/runs/"
BATCH = "/api/v1/runs/batch/"


def post_text(client, url: str, text: str):
    """A body as written, escapes included (the test client would encode a Python string's surrogates)."""
    return client.post(url, text, content_type="application/json")


def single(fields: str) -> str:
    return "{" + fields + "}"


def batched(fields: str) -> str:
    return '{"runs": [{"agent": "echo", "input": {}}, {' + fields + "}]}"


@pytest.fixture(params=["single", "batch"])
def shape(request):
    """The same item submitted alone, or as the second item of a batch: (url, wrap, where its errors are)."""
    if request.param == "single":
        return RUNS, single, lambda body: body
    return BATCH, batched, lambda body: body["runs"]["1"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ('"agent": "echo", "input": {"text": "a\\u0000b"}', "text"),
        ('"agent": "echo", "input": {"a\\u0000b": 1}', "a\\x00b"),
        ('"agent": "echo", "input": {"deep": [{"text": "\\u0000"}]}', "deep.0.text"),
        ('"agent": "echo", "input": {"x": 1e999}', "x"),
    ],
    ids=["nul-in-text", "nul-in-key", "nul-nested", "infinite-number"],
)
def test_what_postgresql_cannot_store_answers_400_naming_the_place_in_the_input(api, shape, fields, field):
    url, wrap, errors_of = shape

    response = post_text(api, url, wrap(fields))

    assert response.status_code == 400
    assert field in errors_of(response.json())["input"]
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ('"agent": "echo", "input": {"text": "\\ud800"}', ("input", "text")),
        ('"agent": "echo", "input": {"\\udc00": 1}', ("input", "\\udc00")),
        ('"agent": "echo", "input": {}, "tier": "\\ud800"', ("tier",)),
    ],
    ids=["in-text", "in-key", "in-another-field"],
)
def test_a_lone_surrogate_answers_400_naming_where_it_is(api, shape, fields, where):
    url, wrap, errors_of = shape

    response = post_text(api, url, wrap(fields))

    assert response.status_code == 400
    errors = errors_of(response.json())
    for part in where:
        errors = errors[part]
    assert "surrogate" in errors[0]
    assert not Run.objects.exists()


def test_a_surrogate_pair_is_text_like_any_other(api):
    response = post_text(api, RUNS, single('"agent": "echo", "input": {"smile": "\\ud83d\\ude00"}'))

    assert response.status_code == 201
    assert response.json()["input"] == {"smile": "\U0001f600"}


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_a_body_nested_a_thousand_levels_deep_answers_400(api, shape, opening):
    url, wrap, _ = shape
    closing = "]" if opening == "[" else "}"
    deep = opening * 1000 + "1" + closing * 1000

    response = post_text(api, url, wrap(f'"agent": "echo", "input": {{"deep": {deep}}}'))

    assert response.status_code == 400
    assert "levels deep" in response.json()["detail"]
    assert not Run.objects.exists()


def test_an_input_nested_past_the_limit_answers_400_naming_where(api, shape, settings):
    settings.RUN_INPUT_MAX_DEPTH = 3
    url, wrap, errors_of = shape

    response = post_text(api, url, wrap('"agent": "echo", "input": {"a": {"b": {"c": [1]}}}'))

    assert response.status_code == 400
    assert "Nested more than 3 levels" in errors_of(response.json())["input"]["a.b.c"][0]


def test_an_input_nested_to_the_limit_is_accepted(api, settings):
    settings.RUN_INPUT_MAX_DEPTH = 3

    assert post_text(api, RUNS, single('"agent": "echo", "input": {"a": {"b": [1]}}')).status_code == 201


def test_brackets_inside_strings_do_not_count_as_nesting(api, settings):
    settings.RUN_INPUT_MAX_DEPTH = 2

    response = post_text(api, RUNS, single('"agent": "echo", "input": {"text": "' + "[{" * 500 + '"}'))

    assert response.status_code == 201


@pytest.mark.parametrize("expires_in", [1e12, 30 * 86400 + 1, 0])
def test_an_expiry_beyond_30_days_or_not_in_the_future_answers_400(api, shape, expires_in):
    url, wrap, errors_of = shape

    response = post_text(api, url, wrap(f'"agent": "echo", "input": {{}}, "expires_in": {expires_in}'))

    assert response.status_code == 400
    assert "expires_in" in errors_of(response.json())
    assert not Run.objects.exists()


def test_an_expiry_of_30_days_is_accepted(api):
    response = api.post(RUNS, {"agent": "echo", "input": {}, "expires_in": 30 * 86400}, format="json")

    assert response.status_code == 201


def test_an_unknown_field_answers_400_naming_it(api, shape):
    url, wrap, errors_of = shape

    response = post_text(api, url, wrap('"agent": "echo", "input": {}, "expire_in": 5'))

    assert response.status_code == 400
    assert "Unknown field" in errors_of(response.json())["expire_in"][0]
    assert not Run.objects.exists()


def test_an_unknown_field_beside_the_runs_of_a_batch_answers_400_naming_it(api):
    response = api.post(BATCH, {"runs": [{"agent": "echo", "input": {}}], "atomic": False}, format="json")

    assert response.status_code == 400
    assert "Unknown field" in response.json()["atomic"][0]
    assert not Run.objects.exists()


def test_batch_items_errors_are_keyed_by_index(api):
    runs = [{"agent": "echo", "input": {}}, {"agent": "echo", "input": {}, "tier": "urgent"}]

    response = api.post(BATCH, {"runs": runs}, format="json")

    assert response.status_code == 400
    assert list(response.json()["runs"]) == ["1"]
    assert "tier" in response.json()["runs"]["1"]


def test_an_input_field_the_agent_does_not_declare_answers_400_naming_it(api, shape):
    url, wrap, errors_of = shape

    response = post_text(api, url, wrap('"agent": "sleep", "input": {"seconds": 1, "secs": 2}'))

    assert response.status_code == 400
    assert "secs" in errors_of(response.json())["input"]
    assert not Run.objects.exists()


def test_an_agent_whose_input_allows_any_fields_keeps_them(api):
    response = api.post(RUNS, {"agent": "echo", "input": {"anything": [1, 2]}}, format="json")

    assert response.status_code == 201
    assert response.json()["input"] == {"anything": [1, 2]}


def test_an_agent_input_schema_says_that_it_admits_no_other_fields(api):
    schemas = {agent["name"]: agent["input_schema"] for agent in api.get("/api/v1/agents/").json()["results"]}

    assert schemas["sleep"]["additionalProperties"] is False
    assert schemas["echo"]["additionalProperties"] is True


@pytest.mark.parametrize("name", ["a\x00b", "Not-An-Agent"])
def test_a_name_no_agent_can_have_answers_404(api, name):
    response = api.get(f"/api/v1/agents/{name}/")

    assert response.status_code == 404
    assert response.json() == {"detail": "No such agent."}


def test_a_token_holding_nul_is_refused_with_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token a\x00b")

    assert client.get(RUNS).status_code == 401


@pytest.mark.parametrize(
    ("input", "place"),
    [({"text": "\x00"}, "text"), ({"\ud800": 1}, "\\ud800"), ({"x": float("nan")}, "x")],
    ids=["nul", "surrogate", "nan"],
)
def test_code_submitting_an_input_that_cannot_be_stored_is_refused_too(db, input, place):
    with pytest.raises(RunRejected) as refused:
        run_submit(user=UserFactory(), request=RunRequest(agent="echo", input=input))

    assert place in refused.value.errors["input"]
    assert not Run.objects.exists()


def test_code_submitting_an_input_nested_past_the_limit_is_refused(db, settings):
    settings.RUN_INPUT_MAX_DEPTH = 64
    deep: dict = {}
    for _ in range(5000):
        deep = {"a": deep}

    with pytest.raises(RunRejected) as refused:
        run_submit(user=UserFactory(), request=RunRequest(agent="echo", input=deep))

    assert "Nested more than 64 levels" in json.dumps(refused.value.errors)


def test_code_submitting_an_input_with_fields_the_agent_does_not_declare_passes_the_declared_ones(db):
    """A topic's message is shared by every agent reacting to it; each takes the fields it declares."""
    run, _ = run_submit(user=UserFactory(), request=RunRequest(agent="sleep", input={"seconds": 1, "order": 7}))

    assert run.input == {"seconds": 1.0}
