"""A drill's platform: the Procfile's own processes, on a database and a Redis key prefix of the drill's
own, and the private Redis and PostgreSQL servers a drill may break (never the shared ones)."""

import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Celery
from django.conf import settings
from kombu import Queue

from agentplatform.celery import app
from agents.models import Run, RunStatus
from agents.runs.dispatch import EXECUTE_RUN_TASK
from scheduling.tiers import Tier
from tests.drills.executions import LOG_DIR_VARIABLE, ExecutionLog
from tests.procfile import procfile

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
READY_SECONDS = 90
STOP_SECONDS = 15
DRILL_AGENT = "drill.count"
WORKER_COMMAND = re.compile(r"\bcelery -A \S+ worker\b")
# Besides the workers: the web server takes submissions, beat schedules the sweeper.
OTHER_PROCESSES = ("web", "beat")
READY_LINES = {"web": b"Booting worker", "beat": b"beat: Starting..."}
WORKER_READY_LINE = b" ready."
ERROR_LINE = re.compile(rb"ERROR|CRITICAL|Traceback|Error:")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Processes, read from /proc: a process is known by (pid, start time), so a reused pid is never hit.
Identity = tuple[int, str]


def start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ")" do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def identity(pid: int) -> Identity | None:
    started = start_time(pid)
    return None if started is None else (pid, started)


def children_of(pid: int) -> list[Identity]:
    """The live child processes of `pid` (any of its threads may have forked them)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [child for text in task.read_text().split() if (child := identity(int(text)))]
    return found


def kill(process: Identity, sig: signal.Signals = signal.SIGKILL) -> bool:
    """Signal the process if it is still the one we know; whether it was."""
    pid, started = process
    if start_time(pid) != started:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
        return True
    return False


def drill_processes() -> list[str]:
    """The Procfile's processes a drill runs: every Celery worker (the tiers, and any other queue such as
    the sweeper's), beat and the web server."""
    return [name for name, command in procfile().items() if WORKER_COMMAND.search(command) or name in OTHER_PROCESSES]


def drill_env(*, prefix: str, database_url: str, redis_url: str, log_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a drill's processes: this run's settings, the drill's database, Redis and prefix,
    the drill agents, and a sweeper that passes every second."""
    # The test suite's short leases are its own tuning: a drill runs on the platform's defaults unless it says.
    dropped = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "RUN_LEASE_SECONDS", "RUN_HEARTBEAT_SECONDS"}
    env = {name: value for name, value in os.environ.items() if name not in dropped}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        CELERY_BROKER_URL=redis_url,
        REDIS_KEY_PREFIX=prefix,
        AGENT_MODULES="tests.sample_agents,tests.drills.agents,tests.drills.tree_agents",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        BIND_HOST="127.0.0.1",
        SWEEP_INTERVAL_SECONDS="1",
        SWEEP_QUEUED_AFTER_SECONDS="3",
        # The drills submit thousands of runs a minute through one user.
        API_SUBMIT_RATE="1000000/minute",
        # Two processes a pool on this two-core machine (the critical pool's default is four).
        WORKER_CONCURRENCY_CRITICAL="2",
        WORKER_CONCURRENCY_STANDARD="2",
        WORKER_CONCURRENCY_BATCH="2",
        LOG_LEVEL="INFO",
    )
    env[LOG_DIR_VARIABLE] = str(log_dir)
    env.update(overrides)
    return env


@dataclass(frozen=True)
class Database:
    """A database the drill's processes use, and the API token of a user in it."""

    url: str
    token: str

    def statuses(self, tier: str | None = None) -> Counter[str]:
        """How many runs (of `tier`, if given) are in each status."""
        sql = f"SELECT status, count(*) FROM {Run._meta.db_table} WHERE tier = %s OR %s::text IS NULL GROUP BY status"
        with psycopg.connect(self.url, connect_timeout=5) as connection:
            return Counter(dict(connection.execute(sql, [tier, tier]).fetchall()))

    def in_flight(self, tier: str | None = None) -> int:
        """Runs queued or running (of `tier`, if given)."""
        statuses = self.statuses(tier)
        return statuses[RunStatus.QUEUED] + statuses[RunStatus.RUNNING]

    def runs(self) -> dict[str, "RunRow"]:
        """Every run the database holds (a drill's database holds that drill's runs only)."""
        sql = f"SELECT id, status, attempts, error->>'type', input->>'tag', tier FROM {Run._meta.db_table}"
        with psycopg.connect(self.url, connect_timeout=5) as connection:
            return {str(row[0]): RunRow(str(row[0]), *row[1:]) for row in connection.execute(sql)}


@dataclass(frozen=True)
class RunRow:
    id: str
    status: str
    attempts: int
    error_type: str | None
    tag: str | None
    tier: str


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    me: Identity
    # Pool processes and the like seen under it, to be stopped with it.
    descendants: set[Identity] = field(default_factory=set)
    crashed: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[Identity]:
        found = children_of(self.pid) if self.alive() else []
        self.descendants.update(found)
        return found

    def log_text(self) -> bytes:
        try:
            return self.log.read_bytes()
        except OSError:
            return b""


class Stack:
    """The Procfile's processes of one drill; `start` them, break them, `stop` them all."""

    def __init__(self, *, name: str, database: Database, redis_url: str, directory: Path, **env: str) -> None:
        self.name = name
        self.database = database
        self.directory = directory
        self.log_dir = directory / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.executions_dir = directory / "executions"
        self.executions_dir.mkdir(parents=True, exist_ok=True)
        self.executions = ExecutionLog(self.executions_dir)
        self.web_port = free_port()
        self.prefix = f"{settings.REDIS_KEY_PREFIX}{name}:"
        self.redis_url = redis_url
        self.env = drill_env(
            prefix=self.prefix, database_url=database.url, redis_url=redis_url, log_dir=self.executions_dir,
            WEB_PORT=str(self.web_port), **env,
        )  # fmt: skip
        self.commands = procfile()
        self.names = drill_processes()
        self.processes: dict[str, Process] = {}
        self.history: list[Process] = []

    # Processes

    def start(self, *names: str) -> None:
        """Start the named processes (all of a drill's by default) and wait until each is ready."""
        names = names or tuple(self.names)
        started = [self._spawn(name) for name in names]
        deadline = time.monotonic() + READY_SECONDS
        for process in started:
            ready = READY_LINES.get(process.name, WORKER_READY_LINE)
            while ready not in process.log_text():
                if not process.alive() or time.monotonic() > deadline:
                    raise AssertionError(f"{process.name} did not start:\n{process.log_text()[-3000:].decode()}")
                time.sleep(0.1)
        if "web" in names:
            # A worker syncs the drill agents into the database when it starts; the web server must see them.
            self._wait(lambda: self.call("GET", f"/api/v1/agents/{DRILL_AGENT}/", timeout=5)[0] == 200, "the web API")

    def _spawn(self, name: str) -> Process:
        earlier = sum(process.name == name for process in self.history)
        log = self.log_dir / (f"{name}-{earlier + 1}.log" if earlier else f"{name}.log")
        with log.open("wb") as out:
            popen = subprocess.Popen(
                ["bash", "-c", f"exec {self.commands[name]}"],
                cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        process = Process(name=name, popen=popen, log=log, me=identity(popen.pid) or (popen.pid, ""))
        self.processes[name] = process
        self.history.append(process)
        return process

    def _wait(self, ready: Callable[[], bool], what: str, seconds: float = READY_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} was not ready within {seconds:g}s\n{self.diagnostics()}")
            time.sleep(0.2)

    def pool(self, name: str) -> list[Identity]:
        """The pool processes of the worker `name`: the children of its main process."""
        return self.processes[name].children()

    def kill_pool_process(self, name: str, pid: int) -> Identity:
        """SIGKILL one pool process of the worker `name`, as the kernel's OOM killer would."""
        child = next((child for child in self.pool(name) if child[0] == pid), None)
        assert child is not None, f"process {pid} is not a pool process of the {name} worker"
        kill(child)
        return child

    def crash(self, name: str) -> None:
        """SIGKILL the process `name` and every child it has, at once, as a crash of its host would."""
        process = self.processes[name]
        children = process.children()
        kill(process.me)
        for child in children:
            kill(child)
        process.popen.wait(timeout=STOP_SECONDS)
        process.crashed = True

    def stop(self) -> None:
        """Stop every process this drill started (politely, then SIGKILL), and whatever they forked."""
        for process in self.history:
            process.children()
            if process.alive():
                kill(process.me, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for process in self.history:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.alive():
                kill(process.me)
                process.popen.wait()
        for process in self.history:
            for descendant in process.descendants:
                kill(descendant)

    def diagnostics(self) -> str:
        """Processes that died without the drill killing them, and the last error lines of every log."""
        lines = []
        for process in self.history:
            if not process.crashed and not process.alive():
                lines.append(f"{process.name} (pid {process.pid}) exited with {process.popen.returncode}")
            errors = [line for line in process.log_text().splitlines() if ERROR_LINE.search(line)]
            if errors:
                lines.append(f"{process.log.name}: {len(errors)} error lines, the last ones:")
                lines += [f"    {line.decode(errors='replace')[:300]}" for line in errors[-4:]]
        lines.append(self.broker_state())
        return "\n".join(lines)

    # The API

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> tuple[int | None, Any]:
        """(status, parsed body) of one request to the web server; (None, reason) if no answer came."""
        connection = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=timeout)
        headers = {"Authorization": f"Token {self.database.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            return None, repr(exc)
        finally:
            connection.close()
        try:
            return response.status, json.loads(content)
        except ValueError:
            return response.status, content

    def submit_batch(self, runs: list[dict[str, Any]], *, timeout: float = 60) -> list[str]:
        """Submit runs in one batch request; the ids of the runs it accepted (201)."""
        status, body = self.call("POST", "/api/v1/runs/batch/", {"runs": runs}, timeout=timeout)
        assert status == 201, f"batch submission answered {status}: {str(body)[:500]}"
        return [run["id"] for run in body]

    # The broker

    def _broker(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def broker_state(self) -> str:
        """How many messages wait in each queue, and how many were delivered and not acknowledged yet."""
        try:
            broker = self._broker()
            queues = {queue.name: broker.llen(f"{self.prefix}{queue.name}") for queue in app.conf.task_queues}
            unacknowledged = broker.hlen(f"{self.prefix}unacked")
        except redis.RedisError as exc:
            return f"broker: not readable ({exc})"
        return f"broker: messages waiting {queues}, delivered and not acknowledged {unacknowledged}"

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a queue of this drill's broker."""
        return self._broker().llen(f"{self.prefix}{queue}")

    def queued_messages(self, queue: str) -> list[tuple[bytes, list[str]]]:
        """The messages waiting in a queue, oldest first: each as the broker holds it, and the run ids it carries."""
        messages = []
        for raw in reversed(self._broker().lrange(f"{self.prefix}{queue}", 0, -1)):
            args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
            messages.append((raw, args))
        return messages

    def deliver_again(self, queue: str, raw: bytes) -> None:
        """Put a copy of a message, byte for byte, back in its queue: as the broker does with a message it
        thinks unacknowledged too long."""
        self._broker().lpush(f"{self.prefix}{queue}", raw)

    def publish(self, run_ids: list[str], *, queue: str, time_limit: float) -> None:
        """Send a new message for the runs, built as the platform builds one (agents/runs/dispatch.py)."""
        publisher = Celery("drill-publisher", broker=self.redis_url, set_as_current=False)
        publisher.conf.update(
            task_queues=[Queue(tier.queue, routing_key=tier.queue) for tier in Tier],
            task_serializer="json",
            broker_transport_options={"global_keyprefix": self.prefix},
        )
        with publisher.producer_or_acquire() as producer:
            publisher.send_task(EXECUTE_RUN_TASK, args=run_ids, queue=queue, time_limit=time_limit, producer=producer)
        publisher.close()


class PrivateRedis:
    """A Redis server of the drill's own on a free loopback port, keeping nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        with (self.directory / f"redis-{self.starts}.log").open("wb") as out:
            self.process = subprocess.Popen(
                ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
                 "--dir", str(self.directory)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the private Redis server did not start on port {self.port}")
            time.sleep(0.05)

    def crash(self) -> None:
        """SIGKILL the server: whatever it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# Staff, like the shared database's drill user: a staff user may submit to every tier.
CREATE_TOKEN = (
    "from django.contrib.auth import get_user_model; from rest_framework.authtoken.models import Token; "
    "print(Token.objects.create(user=get_user_model().objects.create_user('drill', is_staff=True)).key)"
)


def manage(env: dict[str, str], *arguments: str) -> str:
    """Run a management command in `env`; its output, or AssertionError with its errors."""
    done = subprocess.run(
        [sys.executable, "manage.py", *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode:
        raise AssertionError(f"manage.py {arguments[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


class PrivatePostgres:
    """A PostgreSQL server of the drill's own, in a temporary directory owned by the postgres user."""

    DATABASE = "agentplatform"

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="drill-postgres-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.data = self.directory / "data"
        self.port = free_port()
        self.running = False

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{self.DATABASE}"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    def _pg_ctl(self, *arguments: str) -> None:
        self._as_postgres(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-w", *arguments)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._pg_ctl("-l", str(self.directory / "server.log"), "-o", options, "start")
        self.running = True

    def stop(self) -> None:
        """Stop the server as an operator would: `pg_ctl stop -m fast` ends every connection."""
        self._pg_ctl("-m", "fast", "stop")
        self.running = False

    def prepare(self, env: dict[str, str]) -> Database:
        """initdb, start, create and migrate the database, and a user with a token in it."""
        self._as_postgres(
            str(POSTGRES_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "--no-sync", "-U", "postgres"
        )
        self.start()
        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.DATABASE}"')
        env = {**env, "DATABASE_URL": self.url}
        manage(env, "migrate", "--noinput")
        return Database(url=self.url, token=manage(env, "shell", "-c", CREATE_TOKEN).split()[-1])

    def remove(self) -> None:
        if self.running:
            with contextlib.suppress(subprocess.SubprocessError):
                self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)
