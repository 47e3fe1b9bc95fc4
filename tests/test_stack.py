"""`make up` as a user runs it: the whole stack on a fresh SQLite file, driven over HTTP (the file is read only to
see what a stop leaves in it)."""

import base64
import http.client as http_client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings

from agents.models import Run
from tests.sse import EventStreamClient

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 150
STOP_SECONDS = 30
TOKEN_LINE = re.compile(r"API token\s+([0-9a-f]{40})")
# As on a fresh machine: make up generates the secret key and Flower's credentials.
GENERATED_BY_MAKE_UP = {"SECRET_KEY", "FLOWER_BASIC_AUTH"}
FLOWER_LINE = re.compile(r"Flower\s+\S+\s+\(user (\S+), password (\S+)\)")
# Loopback only: no proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(
    method: str,
    url: str,
    *,
    token: str | None = None,
    basic: str | None = None,
    body: object = None,
    timeout: float = 30,
) -> tuple:
    """(status, parsed JSON or raw bytes) of one request, with an API token or `user:password` (basic auth)."""
    headers = {"Authorization": f"Token {token}"} if token else {}
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(basic.encode()).decode()
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with OPENER.open(request, timeout=timeout) as response:
            status, content, kind = response.status, response.read(), response.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        status, content, kind = exc.code, exc.read(), exc.headers.get_content_type()
    return status, json.loads(content) if kind == "application/json" else content


def stack_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """This run's environment, on a fresh SQLite file and its own Redis key prefix."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"DATABASE_URL", "CELERY_BROKER_URL", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", *GENERATED_BY_MAKE_UP}
    }
    env.update(
        DATA_DIR=str(tmp_path / "data"),
        STATIC_ROOT=str(tmp_path / "static"),
        WEB_PORT=str(free_port()),
        FLOWER_PORT=str(free_port()),
        EVENTS_PORT=str(free_port()),
        ADMIN_PASSWORD="stack-test-password",
        REDIS_KEY_PREFIX=f"{settings.REDIS_KEY_PREFIX}stack:",
        AGENT_MODULES="",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


def proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, state) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ")" do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), fields[19], fields[0])
    return table


@dataclass
class ProcessTree:
    """Every process descended from `root` while it ran, each known by (pid, start time)."""

    root: int
    seen: set[tuple[int, str]] = field(default_factory=set)

    def collect(self) -> None:
        table = proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in table:
                self.seen.add((pid, table[pid][1]))
            stack.extend(children.get(pid, []))

    def alive(self) -> list[str]:
        table = proc_table()
        running = []
        for pid, started in self.seen:
            if pid in table and table[pid][1] == started and table[pid][2] != "Z":
                with suppress(OSError):
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    running.append(f"{pid} {command}")
        return running

    def kill_all(self) -> None:
        table = proc_table()
        for pid, started in self.seen:
            if pid in table and table[pid][1] == started:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Stack:
    process: subprocess.Popen
    log: Path
    tree: ProcessTree
    web: str
    flower: str
    events: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def fail(self, reason: str) -> None:
        pytest.fail(f"{reason}\n--- make up output (last 6000 characters) ---\n{self.output()[-6000:]}")

    def token(self) -> str:
        match = TOKEN_LINE.search(self.output())
        if match is None:
            self.fail("make up printed no API token")
        return match.group(1)

    def flower_credentials(self) -> str:
        """The `user:password` that make up generated for Flower and printed."""
        match = FLOWER_LINE.search(self.output())
        if match is None:
            self.fail("make up printed no Flower credentials")
        return f"{match.group(1)}:{match.group(2)}"

    def wait_until(self, what: str, ready, deadline: float) -> None:
        while not ready():
            if self.process.poll() is not None:
                self.fail(f"make up exited ({self.process.returncode}) before {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.25)

    def answers(self, url: str, basic: str | None = None) -> bool:
        try:
            return http("GET", url, basic=basic, timeout=5)[0] == 200
        except OSError:
            return False

    def submit(self, agent: str, input: dict, tier: str | None = None) -> dict:
        """Submit a run (as admin, who may use every tier); the run as the API answers it."""
        body = {"agent": agent, "input": input, **({"tier": tier} if tier else {})}
        status, run = http("POST", f"{self.web}/api/v1/runs/", token=self.token(), body=body)
        if status != 201:
            self.fail(f"submitting {agent} answered {status}: {run}")
        return run

    def run(self, agent: str, input: dict, deadline: float, tier: str | None = None) -> dict:
        """Submit a run and wait (?wait=20, again if needed) until it has finished."""
        run = self.submit(agent, input, tier)
        while run["status"] in {"queued", "running"} and time.monotonic() < deadline:
            status, run = http("GET", f"{self.web}/api/v1/runs/{run['id']}/?wait=20", token=self.token())
            if status != 200:
                self.fail(f"reading run {run} answered {status}")
        return run

    def stopped_within(self, seconds: float) -> list[str]:
        """Wait for make and every process of the stack to end; what is still running after `seconds`."""
        deadline = time.monotonic() + seconds
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return [f"make ({self.process.pid}) still running", *self.tree.alive()]
        while (running := self.tree.alive()) and time.monotonic() < deadline:
            time.sleep(0.25)
        return running


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    """The project is installed before `make up` is timed (a no-op when pyproject.toml has not changed)."""
    subprocess.run(["make", "--silent", ".venv/.installed"], cwd=ROOT, check=True, timeout=600)


@contextmanager
def make_up(tmp_path: Path) -> Iterator[Stack]:
    """`make up` in its own session; whatever is left of it is killed on the way out."""
    env = stack_env(tmp_path)
    log = tmp_path / "make-up.log"
    # Appending, as supervisord and the processes write to it: writes at another offset would overwrite them.
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["make", "up"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    tree = ProcessTree(process.pid)
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            tree.collect()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stack = Stack(
        process=process,
        log=log,
        tree=tree,
        web=f"http://127.0.0.1:{env['WEB_PORT']}",
        flower=f"http://127.0.0.1:{env['FLOWER_PORT']}",
        events=f"http://127.0.0.1:{env['EVENTS_PORT']}",
    )
    try:
        yield stack
    finally:
        watching.set()
        watcher.join()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        tree.kill_all()
        process.wait()


def serving(stack: Stack) -> None:
    """Wait until the web server and Flower answer and a run goes through a worker."""
    deadline = time.monotonic() + START_SECONDS
    stack.wait_until("the web server", lambda: stack.answers(f"{stack.web}/admin/login/"), deadline)
    flower = stack.flower_credentials()
    stack.wait_until("Flower", lambda: stack.answers(f"{stack.flower}/healthcheck", flower), deadline)
    stack.wait_until("the events server", lambda: stack.answers(f"{stack.events}/admin/login/"), deadline)
    run = stack.run("echo", {"hello": "world"}, deadline)
    assert run["status"] == "succeeded", run
    assert run["result"] == {"hello": "world"}
    stack.tree.collect()


def tier_workers(stack: Stack) -> dict[str, list[int]]:
    """The pids of each tier's worker processes (main process and pool), by tier."""
    workers: dict[str, list[int]] = {}
    for pid, _ in stack.tree.seen:
        with suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"worker" in command and b"-Q" in command:
                workers.setdefault(command[command.index(b"-Q") + 1].decode(), []).append(pid)
    return workers


def worker_main_process(stack: Stack, tier: str) -> int:
    """The pid of the main process of the tier's worker: the one whose parent is none of that worker's."""
    stack.tree.collect()
    pids = set(tier_workers(stack).get(tier, []))
    table = proc_table()
    mains = [pid for pid in pids if pid in table and table[pid][0] not in pids and table[pid][2] != "Z"]
    if len(mains) != 1:
        stack.fail(f"expected one main process of the {tier} worker, found {mains}")
    return mains[0]


def run_row(tmp_path: Path, run_id: str) -> dict:
    """A run's row as the stack's SQLite database holds it."""
    with closing(sqlite3.connect(tmp_path / "data" / "agentplatform.sqlite3")) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(f"SELECT * FROM {Run._meta.db_table} WHERE id = ?", [run_id.replace("-", "")]).fetchone()
    return dict(row)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_make_up_serves_the_platform_and_ctrl_c_stops_all_of_it_handing_back_the_runs_in_progress(tmp_path):
    with make_up(tmp_path) as stack:
        serving(stack)

        run = stack.run("text_stats", {"text": "Agents run. Workers work hard!", "top": 2}, time.monotonic() + 60)
        assert run["status"] == "succeeded", run
        assert run["result"]["words"] == 5
        assert run["result"]["sentences"] == 2
        assert run["result"]["top_terms"] == [{"term": "agents", "count": 1}, {"term": "hard", "count": 1}]
        for path in ("/admin/login/", "/api/docs/", "/api/schema/"):
            assert http("GET", f"{stack.web}{path}")[0] == 200, path
        assert http("GET", f"{stack.flower}/", basic=stack.flower_credentials())[0] == 200
        assert http("GET", f"{stack.flower}/")[0] == 401
        # The generated secrets are kept for the next start, readable by their owner alone.
        data = tmp_path / "data"
        assert (data / "flower_basic_auth").read_text().strip() == stack.flower_credentials()
        assert {(data / name).stat().st_mode & 0o777 for name in ("flower_basic_auth", "secret_key")} == {0o600}
        # Run events stream from the events process, to which the web process redirects.
        redirect = http_client.HTTPConnection("127.0.0.1", int(stack.web.rsplit(":", 1)[1]), timeout=10)
        redirect.request("GET", "/api/v1/events/?agent=echo")
        assert redirect.getresponse().getheader("Location") == f"{stack.events}/api/v1/events/?agent=echo"
        events = EventStreamClient(f"{stack.events}/api/v1/events/?agent=echo", token=stack.token())
        events.subscribed()
        echoed = stack.run("echo", {"streamed": True}, time.monotonic() + 60)
        assert [events.next_event().event for _ in range(3)] == ["queued", "started", "succeeded"]
        assert echoed["status"] == "succeeded"
        events.close()
        # Batch work only gets the CPU that nothing else wants; the other tiers run normally.
        workers = tier_workers(stack)
        assert set(workers) == {"critical", "standard", "batch", "housekeeping"}
        assert {os.sched_getscheduler(pid) for pid in workers["batch"]} == {os.SCHED_IDLE}
        assert {os.getpriority(os.PRIO_PROCESS, pid) for pid in workers["batch"]} == {19}
        assert {os.sched_getscheduler(pid) for pid in workers["critical"]} == {os.SCHED_OTHER}
        # Ctrl-C reaches the process manager alone: no worker process is in the terminal's process group.
        assert os.getpgid(stack.process.pid) not in {os.getpgid(pid) for pids in workers.values() for pid in pids}
        # A run in progress at Ctrl-C is queued again at once, its attempt not spent, without a traceback.
        sleeping = stack.submit("sleep", {"seconds": 600})
        stack.wait_until(
            "the run starting",
            lambda: (
                http("GET", f"{stack.web}/api/v1/runs/{sleeping['id']}/", token=stack.token())[1]["status"] == "running"
            ),
            time.monotonic() + START_SECONDS,
        )
        before = len(stack.log.read_bytes())

        os.killpg(stack.process.pid, signal.SIGINT)

        assert stack.stopped_within(STOP_SECONDS) == []
        row = run_row(tmp_path, sleeping["id"])
        assert (row["status"], row["attempts"], row["lost_attempts"], row["error"]) == ("queued", 0, 0, None)
        stopping = stack.log.read_bytes()[before:].decode(errors="replace")
        assert "Traceback" not in stopping, stopping[-6000:]
        assert "WorkerLost" not in stopping, stopping[-6000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_worker_is_restarted_while_the_api_keeps_answering(tmp_path):
    with make_up(tmp_path) as stack:
        serving(stack)
        killed = worker_main_process(stack, "critical")

        os.kill(killed, signal.SIGKILL)

        assert http("GET", f"{stack.web}/api/v1/agents/", token=stack.token())[0] == 200
        run = stack.run("echo", {"after": "restart"}, time.monotonic() + START_SECONDS, tier="critical")
        assert run["status"] == "succeeded", run
        assert worker_main_process(stack, "critical") != killed
        assert re.search(r"exited: critical \(terminated by SIGKILL; not expected\)", stack.output()), stack.output()
        assert re.search(r"spawned: 'critical' with pid \d+", stack.output().split("exited: critical", 1)[1])
        # Nothing of the killed worker is left behind once the stack stops.
        os.killpg(stack.process.pid, signal.SIGINT)
        assert stack.stopped_within(STOP_SECONDS) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_make_alone_stops_the_whole_stack(tmp_path):
    with make_up(tmp_path) as stack:
        serving(stack)

        stack.process.send_signal(signal.SIGTERM)
        assert stack.stopped_within(STOP_SECONDS) == []


def test_running_a_process_the_procfile_does_not_list_fails_with_one_line_naming_those_it_does():
    done = subprocess.run(
        [sys.executable, "bin/procfile", "run", "no-such-process"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    assert done.returncode != 0
    (line,) = done.stderr.splitlines()
    assert "'no-such-process'" in line
    assert "web, events" in line


@pytest.mark.timeout(120)
def test_make_up_without_redis_says_so_in_one_line_and_fails(tmp_path):
    with socket.socket() as closed:
        # Bound but not listening: connections to it are refused for as long as it is held.
        closed.bind(("127.0.0.1", 0))
        env = stack_env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{closed.getsockname()[1]}/0")
        done = subprocess.run(
            ["make", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, start_new_session=True
        )

    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    about_redis = [line for line in output.splitlines() if "redis" in line.lower()]
    assert len(about_redis) == 1, output
    assert "redis-server" in about_redis[0]
    assert not (tmp_path / "data").exists()
