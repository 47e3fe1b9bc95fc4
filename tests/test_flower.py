"""Flower asks for credentials on every route and shows no secret: a Redis with a password, a real
worker and a real Flower, each started here and stopped by pid."""

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from django.conf import settings

from agentplatform.flower import credentials_match
from agentplatform.worker_inspect import MASK, settings_censored
from tests.conftest import ROOT, worker_env
from tests.polling import eventually

START_SECONDS = 60
# Loopback only: no proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# Censoring, as the worker applies it to what Flower shows.


def test_censored_settings_mask_the_password_of_every_url():
    url = "redis://:hunter2@cache.internal:6379/0"
    shown = settings_censored(
        {
            "REDIS_URL": url,
            "CELERY_BROKER_URL": f"{url};redis://user:hunter2@replica.internal:6379/0",
            "CACHES": {"default": {"LOCATION": url, "BACKEND": "django.core.cache.backends.redis.RedisCache"}},
            "ORIGINS": [url],
        }
    )

    assert "hunter2" not in json.dumps(shown)
    assert shown["REDIS_URL"] == f"redis://:{MASK}@cache.internal:6379/0"
    assert shown["CELERY_BROKER_URL"].endswith(f";redis://user:{MASK}@replica.internal:6379/0")
    assert shown["CACHES"]["default"]["LOCATION"] == f"redis://:{MASK}@cache.internal:6379/0"


def test_censored_settings_hide_the_whole_database_settings():
    databases = {"default": {"HOST": "db.internal", "USER": "platform", "NAME": "agents", "PASSWORD": "hunter2"}}

    assert settings_censored({"DATABASES": databases}) == {"DATABASES": MASK}


def test_censored_settings_hide_secret_looking_names_and_keep_the_rest():
    shown = settings_censored({"SECRET_KEY": "k", "SENTRY_DSN": "d", "FLOWER_BASIC_AUTH": "a:b", "TIME_ZONE": "UTC"})

    assert shown == {"SECRET_KEY": MASK, "SENTRY_DSN": MASK, "FLOWER_BASIC_AUTH": MASK, "TIME_ZONE": "UTC"}


def test_credentials_match_only_a_basic_header_carrying_a_configured_pair():
    entries = ["admin:right", "ops:other"]

    assert credentials_match(basic("ops:other"), entries)
    assert not credentials_match(basic("admin:wrong"), entries)
    assert not credentials_match("Bearer " + base64.b64encode(b"admin:right").decode(), entries)
    assert not credentials_match("Basic not-base64!", entries)
    assert not credentials_match("", entries)


# The real thing.


@dataclass
class FlowerStack:
    url: str
    credentials: str
    redis_password: str
    redis_url: str
    worker: str

    def get(self, path: str, *, credentials: str | None = None, method: str = "GET") -> tuple[int, str]:
        """(status, body) of one request, with the given credentials or none."""
        headers = {"Authorization": basic(credentials)} if credentials else {}
        data = b"" if method == "POST" else None
        request = urllib.request.Request(f"{self.url}{path}", headers=headers, method=method, data=data)
        try:
            with OPENER.open(request, timeout=30) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def authorized(self, path: str) -> tuple[int, str]:
        return self.get(path, credentials=self.credentials)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(processes: list[subprocess.Popen]) -> None:
    """Ask every process to stop at once (they shut down side by side), then kill any still running after 20 s."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses on which something listens on `port` (from /proc/net/tcp)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:
            addresses.add(socket.inet_ntoa(int(host, 16).to_bytes(4, "little")))
    return addresses


@pytest.fixture(scope="module")
def stack(django_db_setup, tmp_path_factory) -> Iterator[FlowerStack]:
    """A redis-server with a password, one worker and Flower (as the Procfile starts it) pointed at it."""
    logs = tmp_path_factory.mktemp("flower")
    redis_password = secrets.token_urlsafe(24)
    redis_port = free_port()
    redis_server = _start(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(redis_port),
            "--requirepass",
            redis_password,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        dict(os.environ),
        logs / "redis.log",
    )
    started = [redis_server]
    try:
        client = redis.Redis(port=redis_port, password=redis_password)

        def redis_answers() -> bool:
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        eventually(redis_answers, seconds=START_SECONDS, what="the private redis-server answering")
        redis_url = f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"
        env = worker_env()
        env.pop("CELERY_BROKER_URL", None)
        env["REDIS_URL"] = redis_url
        worker = f"flower-{os.environ['TEST_RUN_ID']}@{socket.gethostname()}"
        started.append(
            _start(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "agentplatform",
                    "worker",
                    "-Q",
                    "critical",
                    "-n",
                    worker,
                    "--concurrency",
                    "1",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "INFO",
                ],
                env,
                logs / "worker.log",
            )
        )
        credentials = f"admin:{secrets.token_urlsafe(16)}"
        flower_port = free_port()
        # As the Procfile runs it, less --address: Flower listens on loopback by default.
        flower = _start(
            [sys.executable, "-m", "agentplatform.flower", f"--port={flower_port}", "--enable_events=false"],
            {**env, "FLOWER_BASIC_AUTH": credentials},
            logs / "flower.log",
        )
        started.append(flower)
        stack = FlowerStack(
            url=f"http://127.0.0.1:{flower_port}",
            credentials=credentials,
            redis_password=redis_password,
            redis_url=redis_url,
            worker=worker,
        )

        def serving() -> bool:
            if flower.poll() is not None:
                pytest.fail(f"Flower exited:\n{(logs / 'flower.log').read_text()[-3000:]}")
            try:
                return stack.authorized("/healthcheck")[0] == 200
            except OSError:
                return False

        eventually(serving, seconds=START_SECONDS, what="Flower answering")

        def worker_shown() -> bool:
            status, body = stack.authorized("/api/workers?refresh=1")
            return status == 200 and "conf" in json.loads(body).get(worker, {})

        eventually(worker_shown, seconds=START_SECONDS, what="the worker showing in Flower", every=0.5)
        yield stack
    finally:
        _stop(started[::-1])


ROUTES = [
    "/",
    "/workers",
    "/broker",
    "/tasks",
    "/tasks/datatable",
    "/task/00000000-0000-0000-0000-000000000000",
    "/metrics",
    "/healthcheck",
    "/api/workers",
    "/api/tasks",
    "/api/task/types",
    "/api/queues/length",
    "/api/task/info/00000000-0000-0000-0000-000000000000",
    "/static/js/flower.js",
    "/login",
    "/logout",
    "/no/such/page",
]
PAGES = ["/", "/workers", "/broker", "/tasks", "/metrics", "/healthcheck", "/api/workers", "/api/queues/length"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ROUTES)
def test_every_route_answers_401_without_credentials(stack, path):
    status, body = stack.get(path)

    assert status == 401, body


@pytest.mark.slow
def test_the_worker_page_answers_401_without_credentials(stack):
    assert stack.get(f"/worker/{stack.worker}")[0] == 401


@pytest.mark.slow
def test_wrong_credentials_are_refused(stack):
    user = stack.credentials.partition(":")[0]

    assert stack.get("/", credentials=f"{user}:wrong")[0] == 401
    assert stack.get("/metrics", credentials=f"{user}:wrong")[0] == 401


@pytest.mark.slow
def test_a_control_request_without_credentials_is_refused(stack):
    status, _ = stack.get(f"/api/worker/shutdown/{stack.worker}", method="POST")

    assert status == 401


@pytest.mark.slow
@pytest.mark.parametrize("path", PAGES)
def test_pages_answer_200_with_credentials(stack, path):
    status, body = stack.authorized(path)

    assert status == 200, body[-2000:]


@pytest.mark.slow
def test_the_worker_page_answers_200_with_credentials_and_lists_its_configuration(stack):
    status, body = stack.authorized(f"/worker/{stack.worker}")

    assert status == 200
    assert "REDIS_URL" in body


@pytest.mark.slow
def test_the_worker_configuration_shows_urls_without_their_password_and_no_database_settings(stack):
    conf = json.loads(stack.authorized("/api/workers?refresh=1")[1])[stack.worker]["conf"]

    masked = stack.redis_url.replace(stack.redis_password, MASK)
    assert conf["REDIS_URL"] == masked
    assert conf["CELERY_BROKER_URL"] == masked
    assert conf["CACHES"]["default"]["LOCATION"] == masked
    assert conf["DATABASES"] == MASK
    assert conf["SECRET_KEY"] == MASK


@pytest.mark.slow
def test_no_page_shows_a_secret(stack):
    database = worker_env()["DATABASE_URL"].rsplit("/", 1)[1]
    secrets_ = [stack.redis_password, stack.credentials.partition(":")[2], settings.SECRET_KEY, database]
    for path in [*PAGES, f"/worker/{stack.worker}", "/api/workers?refresh=1"]:
        status, body = stack.authorized(path)
        assert status == 200, path
        for secret in secrets_:
            assert secret not in body, path


@pytest.mark.slow
def test_the_worker_report_shows_no_redis_password(stack):
    app = Celery(
        "inspector",
        broker=stack.redis_url,
        broker_transport_options={"global_keyprefix": settings.REDIS_KEY_PREFIX},
    )
    replies = app.control.inspect(destination=[stack.worker], timeout=10).report()

    report = replies[stack.worker]["ok"]
    assert "REDIS_URL" in report
    assert stack.redis_password not in report


@pytest.mark.slow
def test_flower_listens_on_loopback_unless_told_otherwise(stack):
    port = int(stack.url.rsplit(":", 1)[1])

    assert _listening_addresses(port) == {"127.0.0.1"}


def run_flower(credentials: str | None) -> subprocess.CompletedProcess:
    env = {name: value for name, value in worker_env().items() if name != "FLOWER_BASIC_AUTH"}
    if credentials is not None:
        env["FLOWER_BASIC_AUTH"] = credentials
    return subprocess.run(
        [sys.executable, "-m", "agentplatform.flower", f"--port={free_port()}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_flower_refuses_to_start_without_credentials():
    done = run_flower(None)

    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH is not set" in done.stderr


@pytest.mark.slow
def test_flower_refuses_credentials_without_a_password_and_does_not_echo_them():
    done = run_flower("only-a-password-pasted-here")

    assert done.returncode != 0
    assert "FLOWER_BASIC_AUTH must be user:password" in done.stderr
    assert "only-a-password-pasted-here" not in done.stdout + done.stderr


# The pools, as the Procfile runs them.

POOLS = {"critical": "critical", "standard": "standard", "batch": "batch", "housekeeping": "housekeeping"}


@pytest.fixture
def pools(transactional_db, tmp_path) -> Iterator[FlowerStack]:
    """Flower and the worker of every queue, each started with `bin/procfile run <name>` on this test run's
    Redis prefix (one process a pool), stopped by pid."""
    credentials = f"admin:{secrets.token_urlsafe(16)}"
    flower_port = free_port()
    env = {
        **worker_env(),
        "FLOWER_BASIC_AUTH": credentials,
        "FLOWER_PORT": str(flower_port),
        "BIND_HOST": "127.0.0.1",
        **{f"WORKER_CONCURRENCY_{name.upper()}": "1" for name in POOLS},
    }
    started = []
    try:
        for name in [*POOLS, "flower"]:
            started.append(_start([sys.executable, "bin/procfile", "run", name], env, tmp_path / f"{name}.log"))
        flower = started[-1]
        stack = FlowerStack(
            url=f"http://127.0.0.1:{flower_port}", credentials=credentials, redis_password="",
            redis_url=settings.REDIS_URL, worker="",
        )  # fmt: skip

        def serving() -> bool:
            if flower.poll() is not None:
                pytest.fail(f"Flower exited:\n{(tmp_path / 'flower.log').read_text()[-3000:]}")
            try:
                return stack.authorized("/healthcheck")[0] == 200
            except OSError:
                return False

        eventually(serving, seconds=START_SECONDS, what="Flower answering")
        yield stack
    finally:
        _stop(started[::-1])


@pytest.mark.slow
def test_flower_shows_each_pool_by_name_consuming_its_own_queue(pools):
    host = socket.gethostname()

    def consuming() -> dict[str, set[str]]:
        status, body = pools.authorized("/api/workers?refresh=1")
        assert status == 200, body
        workers = json.loads(body)
        queues = {
            name: {queue["name"] for queue in workers.get(f"{name}@{host}", {}).get("active_queues") or []}
            for name in POOLS
        }
        return queues if all(queues.values()) else {}

    shown = eventually(consuming, seconds=START_SECONDS * 2, what="every pool showing in Flower", every=1)

    assert shown == {name: {queue} for name, queue in POOLS.items()}
