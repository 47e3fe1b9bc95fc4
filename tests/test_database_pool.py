"""A pooled connection is checked when it is taken only if it has sat idle: one handed back a moment ago costs no
round trip, one idle longer is checked and, broken, refused (the pool then opens another)."""

import time

import psycopg
import pytest
from django.db import connection

from agentplatform import database_pool
from agentplatform.database_pool import pooled_connection_check, pooled_connection_returned


@pytest.fixture
def pooled(db):
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    conn = psycopg.connect(**params, autocommit=True)
    yield conn
    conn.close()


def terminated(conn: psycopg.Connection) -> psycopg.Connection:
    """The connection, its server process ended behind its back (as a server restart would)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
    time.sleep(0.05)
    return conn


def test_django_pools_through_the_platform_backend(db):
    assert connection.settings_dict["ENGINE"] == "agentplatform.postgresql"
    assert connection.pool is not None


def test_a_connection_handed_back_a_moment_ago_is_handed_out_without_a_round_trip(pooled):
    pooled_connection_returned(pooled)

    # Broken, yet not found out: the check sent nothing.
    pooled_connection_check(terminated(pooled))


def test_a_connection_idle_longer_than_the_bypass_is_checked_and_refused_when_broken(pooled, monkeypatch):
    monkeypatch.setattr(database_pool, "POOL_CHECK_BYPASS_SECONDS", 0.05)
    pooled_connection_returned(pooled)
    time.sleep(0.1)

    with pytest.raises(psycopg.OperationalError):
        pooled_connection_check(terminated(pooled))


def test_a_connection_never_handed_back_is_checked(pooled):
    with pytest.raises(psycopg.OperationalError):
        pooled_connection_check(terminated(pooled))


def test_a_healthy_idle_connection_passes_its_check(pooled, monkeypatch):
    monkeypatch.setattr(database_pool, "POOL_CHECK_BYPASS_SECONDS", 0.0)
    pooled_connection_returned(pooled)

    pooled_connection_check(pooled)


def test_a_connection_django_hands_back_is_in_the_pool_at_once(transactional_db):
    connection.ensure_connection()
    available = connection.pool.get_stats().get("pool_available", 0)

    connection.close()

    # Not later, from a thread of the pool's: a test database could not be dropped behind such a return.
    assert connection.pool.get_stats().get("pool_available", 0) == available + 1
