"""What the benchmarks share: a throw-away PostgreSQL database and Redis prefix, the platform's
processes started exactly as the Procfile runs them, and a small client of the REST API.

A benchmark calls `configure()` before it imports anything of Django, runs inside `throwaway()`,
which creates the database and on the way out stops every process it started (by pid), deletes
every Redis key under the prefix and drops the database, and starts the platform with
`start_platform()`.
"""

import http.client
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_ID = uuid.uuid4().hex[:8]
PG_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")
DB_NAME = f"agentplatform_bench_{BENCH_ID}"
PREFIX = f"apbench:{BENCH_ID}:"


def configure(**overrides: str) -> None:
    """Point this process, and every process it starts, at the throw-away database and prefix."""
    # Settings refuse to load without a key while DEBUG is off; a benchmark signs nothing worth keeping.
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    os.environ.update(
        DATABASE_URL=f"{PG_URL}/{DB_NAME}",
        REDIS_KEY_PREFIX=PREFIX,
        DJANGO_SETTINGS_MODULE="agentplatform.settings",
        API_SUBMIT_RATE="1000000/minute",
        AGENT_MODULES="",
        LOG_LEVEL="WARNING",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    os.environ.update(overrides)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentiles(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    quantiles = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": quantiles[49], "p95": quantiles[94], "p99": quantiles[98], "max": ordered[-1], "n": len(ordered)}


def paced(rate: float, count: int, call: Callable[[], Any]) -> list:
    """Call call() `count` times at `rate` a second, on schedule (a late call does not shift the next)."""
    results, start = [], time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        results.append(call())
    return results


class Api:
    """One keep-alive connection to the web process; not to be shared between threads."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def another(self) -> "Api":
        """A client with its own connection, for another thread."""
        return Api(self.port, self.token)

    def request(self, method: str, path: str, body: dict | None = None) -> dict | list:
        data = json.dumps(body) if body is not None else None
        try:
            self.connection.request(method, path, data, self.headers)
            response = self.connection.getresponse()
        except (ConnectionError, http.client.HTTPException):
            # The server closes a keep-alive connection left idle between phases.
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.connection.request(method, path, data, self.headers)
            response = self.connection.getresponse()
        payload = json.loads(response.read())
        if response.status not in (200, 201):
            raise RuntimeError(f"{method} {path} answered {response.status}: {payload}")
        return payload

    def post(self, path: str, body: dict) -> dict | list:
        return self.request("POST", path, body)

    def get(self, path: str) -> dict | list:
        return self.request("GET", path)


class Processes:
    """Child processes in their own process groups, stopped by pid."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict[str, str] | None = None, log: str = "") -> subprocess.Popen:
        out = open(ROOT / "var" / f"bench-{BENCH_ID}-{log}.log", "w") if log else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.started.append(process)
        return process

    def stop(self, *processes: subprocess.Popen) -> None:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self.started.remove(process)

    def stop_all(self) -> None:
        self.stop(*self.started)


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def wait_for_workers(names: list[str], seconds: float = 60) -> None:
    from agentplatform.celery import app

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        alive = {name.split("@")[0] for reply in replies for name in reply}
        if set(names) <= alive:
            return
    raise RuntimeError(f"workers {names} did not start")


def delete_prefixed_keys() -> None:
    """Delete every Redis key under the benchmark's prefix (Celery's queues included)."""
    import redis

    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        batch = []
        for key in client.scan_iter(match=f"{PREFIX}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


@contextmanager
def throwaway() -> Iterator[Processes]:
    """A fresh database for the benchmark; afterwards its processes, Redis keys and database are gone."""
    import psycopg

    (ROOT / "var").mkdir(exist_ok=True)
    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    processes = Processes()
    try:
        yield processes
    finally:
        processes.stop_all()
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()
        delete_prefixed_keys()
        with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


def start_platform(
    processes: Processes, workers: list[str], *, also: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Api:
    """Migrate the throw-away database, start the web process, the Celery `workers` and the other
    processes `also` (Procfile names, e.g. beat) under supervisord, wait until the web process and the
    workers answer, and return an API client of a fresh user."""
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    # Staff: the benchmarks submit to the critical tier, which needs the permission staff have.
    user = get_user_model().objects.create_user("bench", password=uuid.uuid4().hex, is_staff=True)
    token = Token.objects.create(user=user).key
    port = free_port()
    processes.start(
        [sys.executable, "bin/procfile", "supervise", "web", *workers, *also],
        env={**(env or {}), "WEB_PORT": str(port)}, log="platform",
    )  # fmt: skip
    wait_for_port(port)
    wait_for_workers(workers)
    return Api(port, token)
