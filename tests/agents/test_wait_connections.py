"""Clients waiting on runs (`?wait=`) hold no database connection, so they never starve submissions."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token

from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory, UserFactory
from tests.procfile import procfile

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("transactional_db")]

WAITERS = 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, token: str, body: object = None, timeout: float = 60) -> int:
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """The web process as the Procfile runs it, with a database pool of four connections per process."""
    command = procfile()["web"]
    port = free_port()
    env = {
        **worker_env(),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WEB_PORT": str(port),
        "DATABASE_POOL_MAX_SIZE": "4",
        "DATABASE_POOL_TIMEOUT": "5",
    }
    log = (tmp_path / "web.log").open("w")
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/admin/login/", timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the web server did not start:\n{(tmp_path / 'web.log').read_text()[-3000:]}")
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_two_hundred_waiters_on_a_pool_of_eight_connections_neither_fail_nor_block_submissions(web):
    user = UserFactory()
    token = Token.objects.create(user=user).key
    # Queued runs with no message: nothing will finish them, so every waiter waits out its time.
    runs = [RunFactory(submitted_by=user) for _ in range(WAITERS)]

    with ThreadPoolExecutor(max_workers=WAITERS + 10) as pool:
        waits = [pool.submit(http, "GET", f"{web}/api/v1/runs/{run.pk}/?wait=4", token) for run in runs]
        time.sleep(1.5)
        submissions = [
            pool.submit(http, "POST", f"{web}/api/v1/runs/", token, {"agent": "echo", "input": {"n": n}})
            for n in range(10)
        ]
        submitted = [future.result() for future in submissions]
        waited = [future.result() for future in waits]

    assert submitted == [201] * 10
    assert waited == [200] * WAITERS
