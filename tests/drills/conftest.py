"""Fixtures of the fault drills: a stack of real processes per drill, and the private servers some break."""

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token

from tests.drills.stack import Database, PrivatePostgres, PrivateRedis, Stack, drill_env
from tests.factories import StaffFactory

# Preparing the private PostgreSQL server (initdb, migrate) takes a while: it starts with the first drill.
PRIVATE_POSTGRES_READY_SECONDS = 240


@pytest.fixture
def shared_database(transactional_db) -> Database:
    """This test run's database, with a staff user (who may submit to every tier) and its API token committed
    for the drill's web server."""
    token = Token.objects.create(user=StaffFactory())
    db = settings.DATABASES["default"]
    return Database(url=f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}", token=token.key)


@pytest.fixture
def make_stack(transactional_db, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Make a drill's stack; every process it started is stopped when the test ends (before its tables are
    emptied)."""
    stacks: list[Stack] = []

    def make(name: str, *, database: Database, redis_url: str | None = None, **env: str) -> Stack:
        stack = Stack(
            name=name, database=database, redis_url=redis_url or settings.REDIS_URL, directory=tmp_path / name, **env
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.crash()


@pytest.fixture(scope="package", autouse=True)
def _private_postgres_prepared_early(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrivatePostgres, Future] | None]:
    """When a selected drill needs the private PostgreSQL server, prepare it in the background from the start."""
    if not any("private_postgres" in item.fixturenames for item in request.session.items):
        yield None
        return
    server = PrivatePostgres()
    env = drill_env(
        prefix=f"{settings.REDIS_KEY_PREFIX}drill-migrate:", database_url=server.url, redis_url=settings.REDIS_URL,
        log_dir=tmp_path_factory.mktemp("drill-migrate"),
    )  # fmt: skip
    with ThreadPoolExecutor(max_workers=1) as executor:
        prepared = executor.submit(server.prepare, env)
        try:
            yield server, prepared
        finally:
            prepared.exception()  # the server is removed only once preparing it has ended
            server.remove()


@pytest.fixture
def private_postgres(_private_postgres_prepared_early) -> tuple[PrivatePostgres, Database]:
    """A PostgreSQL server of the drill's own (never the shared one), migrated, with a user and token."""
    server, prepared = _private_postgres_prepared_early
    return server, prepared.result(timeout=PRIVATE_POSTGRES_READY_SECONDS)
