import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.signals import before_task_publish
from django.conf import settings
from django.core.management.base import CommandError
from django.test import TransactionTestCase
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agentplatform.celery import HOUSEKEEPING_QUEUE
from agentplatform.redis_client import redis_client
from agents.runs.dispatch import MessageAhead
from agents.sync import agent_sync_registry
from scheduling.backlog import backlog_key
from scheduling.tiers import Tier
from tests.factories import StaffFactory, UserFactory

ROOT = Path(__file__).resolve().parent.parent
WORKER_READY_SECONDS = 60
FLUSH_ATTEMPTS = 3


@pytest.fixture(scope="session", autouse=True)
def redis_keys_removed_after_run() -> Iterator[None]:
    """This run's keys live under its own prefix; remove them when it ends."""
    yield
    client = redis_client()
    for key in client.scan_iter(match=f"{settings.REDIS_KEY_PREFIX}*", count=1000):
        client.delete(key)


@pytest.fixture(scope="session", autouse=True)
def _flush_retried_on_deadlock() -> Iterator[None]:
    """A transactional test's tables are emptied while this run's workers may still be finishing its runs.

    TRUNCATE and a worker's statement can then deadlock; PostgreSQL aborts one of them, and when
    it aborts the TRUNCATE, emptying the tables again a moment later succeeds.
    """
    flush = TransactionTestCase._fixture_teardown

    def flush_retried(self) -> None:
        for attempt in range(FLUSH_ATTEMPTS):
            try:
                return flush(self)
            except CommandError as exc:
                if attempt == FLUSH_ATTEMPTS - 1 or "deadlock" not in str(exc.__cause__):
                    raise
                time.sleep(0.2)

    TransactionTestCase._fixture_teardown = flush_retried
    yield
    TransactionTestCase._fixture_teardown = flush


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _agents_synced(request: pytest.FixtureRequest) -> None:
    """Every database test starts with the registry synced (transactional tests flush the table)."""
    if {"db", "transactional_db"} & set(request.fixturenames):
        request.getfixturevalue("db")  # defers to transactional_db when the test asks for it
        agent_sync_registry()


@pytest.fixture(autouse=True)
def _backlog_counted_from_empty(request: pytest.FixtureRequest) -> None:
    """Like the database, the backlog counters in Redis start empty for every database test."""
    if {"db", "transactional_db"} & set(request.fixturenames):
        redis_client().delete(backlog_key())


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def staff(db):
    return StaffFactory()


@pytest.fixture
def staff_client(client, staff):
    """A Django test client logged in as a staff superuser (the admin)."""
    client.force_login(staff)
    return client


@pytest.fixture
def api(user) -> APIClient:
    """An API client authenticated with the user's token."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    client.user = user
    return client


@pytest.fixture
def api_for():
    """Make an authenticated API client for another user."""

    def make(user) -> APIClient:
        client = APIClient()
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        client.user = user
        return client

    return make


@pytest.fixture
def published() -> Iterator[list[list]]:
    """The arguments of every Celery message published while the test runs."""
    messages: list[list] = []

    def record(sender, body, **kwargs):
        messages.append(body[0])

    before_task_publish.connect(record, weak=False)
    yield messages
    before_task_publish.disconnect(record)


class RoundTrips:
    """Redis round trips made by this process: one per command sent alone, one per pipeline."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __len__(self) -> int:
        return len(self.calls)


@pytest.fixture
def redis_round_trips(monkeypatch) -> RoundTrips:
    """Counts the Redis round trips of this process (the platform's clients and Celery's alike) from now on."""
    trips = RoundTrips()
    command, pipeline = redis.Redis.execute_command, redis.client.Pipeline.execute

    def counted_command(self, *args, **options):
        trips.calls.append(str(args[0]))
        return command(self, *args, **options)

    def counted_pipeline(self, *args, **options):
        trips.calls.append(f"pipeline({len(self.command_stack)})")
        return pipeline(self, *args, **options)

    send_ahead = MessageAhead.send.__func__

    def counted_send_ahead(cls, run):
        # Written without waiting; its replies are read after the insert: a round trip all the same.
        trips.calls.append("message sent ahead")
        return send_ahead(cls, run)

    monkeypatch.setattr(redis.Redis, "execute_command", counted_command)
    monkeypatch.setattr(redis.client.Pipeline, "execute", counted_pipeline)
    monkeypatch.setattr(MessageAhead, "send", classmethod(counted_send_ahead))
    return trips


def worker_env() -> dict[str, str]:
    """The environment of a process that must see this test run's database and Redis prefix."""
    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _start_worker(queue: str, log_dir: Path, concurrency: int = 1) -> tuple[subprocess.Popen, Path]:
    log = log_dir / f"worker-{queue}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "agentplatform",
            "worker",
            "-Q",
            queue,
            "-n",
            f"{queue}-{os.environ['TEST_RUN_ID']}@%h",
            "--concurrency",
            str(concurrency),
            "--prefetch-multiplier",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
            "--logfile",
            str(log),
        ],
        cwd=ROOT,
        # These workers outlive each test's database: a lone run's message they take after its test's rows
        # were flushed finds no row, and would hold a pool process for the whole wait of a run not stored yet.
        env={**worker_env(), "RUN_MESSAGE_AHEAD_WAIT_SECONDS": "0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    return process, log


def _started(started: dict) -> Iterator[dict]:
    """Wait until every worker of `started` is ready, yield them by key, and stop them afterwards."""
    deadline = time.monotonic() + WORKER_READY_SECONDS
    for name, (process, log) in started.items():
        while not (log.exists() and " ready." in log.read_text()):
            if process.poll() is not None or time.monotonic() > deadline:
                for other, _ in started.values():
                    other.kill()
                text = log.read_text() if log.exists() else "(no log)"
                pytest.fail(f"{name} worker did not start:\n{text[-3000:]}")
            time.sleep(0.1)
    yield {name: process for name, (process, _) in started.items()}
    for process, _ in started.values():
        process.terminate()
    for process, _ in started.values():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def workers(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[dict[Tier, subprocess.Popen]]:
    """One real Celery worker per tier, each consuming only its own queue of this run's Redis prefix."""
    log_dir = tmp_path_factory.mktemp("workers")
    yield from _started({tier: _start_worker(tier.queue, log_dir, 2 if tier is Tier.STANDARD else 1) for tier in Tier})


@pytest.fixture(scope="session")
def housekeeping_worker(django_db_setup, tmp_path_factory) -> Iterator[subprocess.Popen]:
    """A real worker on the housekeeping queue (the sweeper and schedule firings), as the Procfile runs it."""
    log_dir = tmp_path_factory.mktemp("housekeeping")
    for started in _started({HOUSEKEEPING_QUEUE: _start_worker(HOUSEKEEPING_QUEUE, log_dir, 2)}):
        yield started[HOUSEKEEPING_QUEUE]
