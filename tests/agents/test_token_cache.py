"""A token is read from the database at most every API_TOKEN_CACHE_SECONDS per process; a change to the token,
its user or their permissions made in this process applies to the next request."""

import time

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.authtoken.models import Token

from agents.api.authentication import known_tokens_forget

RUNS = "/api/v1/runs/"


@pytest.fixture
def tokens_kept(settings):
    settings.API_TOKEN_CACHE_SECONDS = 60
    known_tokens_forget()
    yield
    known_tokens_forget()


def token_reads(queries: CaptureQueriesContext) -> int:
    return sum(Token._meta.db_table in query["sql"] for query in queries.captured_queries)


def test_a_second_request_with_the_same_token_reads_no_token(tokens_kept, api):
    assert api.get(RUNS).status_code == 200

    with CaptureQueriesContext(connection) as queries:
        assert api.get(RUNS).status_code == 200

    assert token_reads(queries) == 0


def test_a_deleted_token_is_refused_at_once(tokens_kept, api):
    assert api.get(RUNS).status_code == 200

    Token.objects.filter(user=api.user).delete()

    assert api.get(RUNS).status_code == 401


def test_a_deactivated_user_is_refused_at_once(tokens_kept, api):
    assert api.get(RUNS).status_code == 200

    api.user.is_active = False
    api.user.save()

    assert api.get(RUNS).status_code == 401


def test_a_permission_granted_applies_to_the_next_submission(tokens_kept, api):
    body = {"agent": "echo", "input": {}, "tier": "critical"}
    assert api.post(RUNS, body, format="json").status_code == 403

    api.user.user_permissions.add(Permission.objects.get(codename="submit_critical"))

    assert api.post(RUNS, body, format="json").status_code == 201


def test_a_token_deleted_by_another_process_is_refused_once_the_copy_is_older_than_its_time(settings, api):
    settings.API_TOKEN_CACHE_SECONDS = 0.3
    known_tokens_forget()
    assert api.get(RUNS).status_code == 200
    # Another process's deletion: a statement this process's models never hear of.
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {Token._meta.db_table}")

    assert api.get(RUNS).status_code == 200
    time.sleep(0.35)
    assert api.get(RUNS).status_code == 401
    known_tokens_forget()
