"""`/healthz` (the process serves) and `/readyz` (the database, Redis and a worker per queue answer)."""

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.conftest import ROOT, worker_env
from tests.polling import eventually

START_SECONDS = 90
# Loopback only: no proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthz_answers_ok_without_asking_anything_else(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"

    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.slow
@pytest.mark.usefixtures("workers", "housekeeping_worker")
def test_readyz_answers_200_when_the_database_redis_and_a_worker_for_every_queue_answer(db, client):
    response = client.get("/readyz")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert body["failed"] == []
    assert body["checks"] == {
        "database": "ok",
        "redis": "ok",
        "workers": {"critical": "ok", "standard": "ok", "batch": "ok", "housekeeping": "ok"},
    }


def test_readyz_answers_503_naming_redis_when_it_does_not_answer(db, client, settings):
    port = closed_port()
    settings.REDIS_URL = f"redis://:redis-password-here@127.0.0.1:{port}/0"

    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert "redis" in body["failed"]
    assert body["checks"]["redis"].startswith("failed")
    assert body["checks"]["database"] == "ok"
    # anyone may ask: the answer names the check, never the server or its credentials
    assert "redis-password-here" not in response.content.decode()
    assert str(port) not in response.content.decode()


def _started(command: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as output:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture
def platform_without_a_batch_worker(django_db_setup, tmp_path) -> Iterator[str]:
    """A web process and one worker serving every queue but batch, on a Redis prefix of their own; yields the URL."""
    env = {**worker_env(), "REDIS_KEY_PREFIX": f"{settings.REDIS_KEY_PREFIX}ready:"}
    port = closed_port()
    worker_log = tmp_path / "worker.log"
    worker = _started(
        [sys.executable, "-m", "celery", "-A", "agentplatform", "worker", "-Q", "critical,standard,housekeeping",
         "-n", f"ready-{port}@%h", "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        env=env, log=worker_log,
    )  # fmt: skip
    web = _started(
        [sys.executable, "-m", "gunicorn", "agentplatform.wsgi:application", "--config",
         "python:agentplatform.gunicorn_conf", "--workers", "1", "--bind", f"127.0.0.1:{port}"],
        env=env, log=tmp_path / "web.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: b" ready." in worker_log.read_bytes(), seconds=START_SECONDS, what="the worker starting")
        eventually(lambda: _get(f"{url}/healthz")[0] == 200, seconds=START_SECONDS, what="the web process starting")
        yield url
    finally:
        for process in (web, worker):
            process.terminate()
        for process in (web, worker):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _get(url: str) -> tuple[int, dict]:
    try:
        with OPENER.open(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


@pytest.mark.slow
def test_readyz_answers_503_naming_the_queue_no_worker_serves(platform_without_a_batch_worker):
    status, body = _get(f"{platform_without_a_batch_worker}/readyz")

    assert status == 503
    assert body["failed"] == ["workers.batch"]
    assert body["checks"]["workers"]["critical"] == "ok"
    assert body["checks"]["workers"]["batch"].startswith("no worker answered")
