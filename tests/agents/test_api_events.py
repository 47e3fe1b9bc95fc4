"""GET /api/v1/events/: run events as Server-Sent Events, served by the real ASGI events process."""

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.models import Agent, RunStatus
from agents.runs.cancellation import run_cancel
from agents.runs.execute import runs_execute
from tests.conftest import ROOT, worker_env
from tests.factories import RunFactory, StaffFactory, UserFactory
from tests.sse import EventStreamClient

pytestmark = pytest.mark.django_db(transaction=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EventsServer(str):
    """The base URL of a running events server, which also knows its process id."""

    pid: int


@pytest.fixture(scope="module")
def events_server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[EventsServer]:
    """The Procfile's events process (uvicorn, the ASGI app) on a free port."""
    port = free_port()
    log = Path(tmp_path_factory.mktemp("events")) / "events.log"
    env = {**worker_env(), "EVENTS_KEEPALIVE_SECONDS": "0.5"}
    command = [sys.executable, "-m", "uvicorn", "agentplatform.asgi:application", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--lifespan", "off", "--timeout-graceful-shutdown", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"events server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
    server = EventsServer(f"http://127.0.0.1:{port}")
    server.pid = process.pid
    yield server
    process.terminate()
    process.wait(timeout=20)


def token_of(user) -> str:
    return Token.objects.get_or_create(user=user)[0].key


def stream(server: str, query: str, user) -> EventStreamClient:
    return EventStreamClient(f"{server}/api/v1/events/?{query}", token=token_of(user) if user else None)


def publish(run, event: str) -> None:
    events.publish_run_events([events.event_of_run(run, event)])


def test_a_run_stream_carries_its_events_and_ends_with_the_run(events_server):
    run = RunFactory()
    client = stream(events_server, f"run={run.pk}", run.submitted_by)
    client.subscribed()

    runs_execute(run_ids=[str(run.pk)], worker="w1")

    received = client.events_until_end()
    assert [item.event for item in received] == ["started", "succeeded"]
    assert received[-1].data["run"] == str(run.pk)
    assert received[-1].data["status"] == "succeeded"
    assert client.headers["content-type"].startswith("text/event-stream")


def test_the_stream_of_a_root_carries_every_event_of_its_tree_and_ends_with_the_root(events_server):
    root = RunFactory()
    child = RunFactory(parent=root, root=root.pk, submitted_by=root.submitted_by, finished=True)
    grandchild = RunFactory(parent=child, root=root.pk, submitted_by=root.submitted_by, finished=True)
    client = stream(events_server, f"run={root.pk}", root.submitted_by)
    client.subscribed()

    publish(grandchild, "succeeded")
    publish(child, "succeeded")
    runs_execute(run_ids=[str(root.pk)], worker="w1")

    received = [(item.data["run"], item.event) for item in client.events_until_end()]
    assert received == [
        (str(grandchild.pk), "succeeded"),
        (str(child.pk), "succeeded"),
        (str(root.pk), "started"),
        (str(root.pk), "succeeded"),
    ]


def test_a_root_stream_hears_the_runs_below_before_the_root_when_they_end_together(events_server):
    root = RunFactory()
    child = RunFactory(parent=root, root=root.pk, submitted_by=root.submitted_by)
    client = stream(events_server, f"run={root.pk}", root.submitted_by)
    client.subscribed()

    # One publish, the root listed first.
    root.status = child.status = RunStatus.CANCELLED
    events.publish_run_events([events.event_of_run(root, "cancelled"), events.event_of_run(child, "cancelled")])

    received = [(item.data["run"], item.event) for item in client.events_until_end()]
    assert received == [(str(child.pk), "cancelled"), (str(root.pk), "cancelled")]


def test_a_root_stream_hears_every_run_below_cancelled_before_the_root_itself(events_server):
    root = RunFactory(status=RunStatus.WAITING)
    child = RunFactory(parent=root, root=root.pk, submitted_by=root.submitted_by, status=RunStatus.WAITING)
    grandchild = RunFactory(parent=child, root=root.pk, submitted_by=root.submitted_by)
    client = stream(events_server, f"run={root.pk}", root.submitted_by)
    client.subscribed()

    run_cancel(run=root)

    received = [(item.data["run"], item.event) for item in client.events_until_end()]
    assert received == [(str(run.pk), "cancelled") for run in (child, grandchild, root)]


def test_events_published_together_reach_an_agent_stream_one_by_one_in_order(events_server):
    user = UserFactory()
    runs = [RunFactory(submitted_by=user, input={"n": n}) for n in range(3)]
    client = stream(events_server, "agent=echo", user)
    client.subscribed()

    events.publish_run_events([events.event_of_run(run, "queued") for run in runs])

    assert [client.next_event().data["run"] for _ in runs] == [str(run.pk) for run in runs]


def test_the_stream_of_a_finished_run_gives_its_final_state_and_ends(events_server):
    run = RunFactory(finished=True)

    received = stream(events_server, f"run={run.pk}", run.submitted_by)

    received.subscribed()
    assert [(item.event, item.data["status"]) for item in received.events_until_end()] == [("succeeded", "succeeded")]


def test_an_agent_stream_shows_a_user_only_their_own_runs(events_server):
    mine, theirs = RunFactory(), RunFactory()
    client = stream(events_server, "agent=echo", mine.submitted_by)
    client.subscribed()

    publish(theirs, "queued")
    publish(mine, "queued")

    item = client.next_event()
    assert (item.event, item.data["run"]) == ("queued", str(mine.pk))


def test_staff_see_every_run_on_the_global_stream(events_server):
    first, second = RunFactory(), RunFactory(agent=Agent.objects.get(name="factorize"))
    client = stream(events_server, "", StaffFactory())
    client.subscribed()

    publish(first, "queued")
    publish(second, "queued")

    assert [client.next_event().data["run"], client.next_event().data["run"]] == [str(first.pk), str(second.pk)]


def test_a_quiet_stream_gets_keepalive_comments(events_server):
    client = stream(events_server, "agent=echo", UserFactory())
    client.subscribed()

    assert client.next(timeout=5).comment == "keepalive"


def test_a_stream_busy_with_other_users_events_still_gets_keepalives(events_server):
    theirs = RunFactory()
    client = stream(events_server, "agent=echo", UserFactory())
    client.subscribed()
    stop = threading.Event()

    def others_publish() -> None:
        while not stop.wait(0.1):
            publish(theirs, "queued")

    publisher = threading.Thread(target=others_publish)
    publisher.start()
    try:
        assert client.next(timeout=3).comment == "keepalive"
    finally:
        stop.set()
        publisher.join()


def test_another_users_run_is_not_found(events_server):
    run = RunFactory()

    response = stream(events_server, f"run={run.pk}", UserFactory())

    assert response.status == 404


@pytest.mark.parametrize(
    ("query", "field"),
    [("agent=nobody", "agent"), ("run=not-a-uuid", "run"), ("tier=batch", "tier")],
)
def test_a_bad_filter_is_400_naming_the_field(events_server, query, field):
    response = stream(events_server, query, UserFactory())

    assert response.status == 400
    assert field in response.json()


def test_a_run_and_an_agent_that_disagree_are_400(events_server):
    run = RunFactory()

    response = stream(events_server, f"run={run.pk}&agent=factorize", run.submitted_by)

    assert response.status == 400
    assert "agent" in response.json()


@pytest.mark.parametrize("query", ["agent=ec%00ho", "run=%00"])
def test_a_filter_holding_nul_is_400(events_server, user, query):
    response = stream(events_server, query, user)

    assert response.status == 400
    assert "NUL" in response.json()[query.split("=")[0]][0]


def test_without_credentials_the_stream_is_401(events_server):
    response = stream(events_server, "", None)

    assert response.status == 401
    assert response.headers["www-authenticate"] == "Token"


def test_a_logged_in_browser_streams_with_its_session_cookie(events_server, client):
    run = RunFactory()
    client.force_login(run.submitted_by)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"

    response = EventStreamClient(f"{events_server}/api/v1/events/?run={run.pk}", cookie=cookie)

    assert response.status == 200
    response.subscribed()


def test_a_closed_stream_leaves_no_subscription_behind(events_server):
    run = RunFactory()
    client = stream(events_server, f"run={run.pk}", run.submitted_by)
    client.subscribed()
    channel = events.run_channel(run.pk)
    assert redis_client().pubsub_numsub(channel) == [(channel.encode(), 1)]

    client.close()

    deadline = time.monotonic() + 5
    while redis_client().pubsub_numsub(channel) != [(channel.encode(), 0)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_client().pubsub_numsub(channel) == [(channel.encode(), 0)]


def test_a_wrong_token_is_401(events_server):
    response = EventStreamClient(f"{events_server}/api/v1/events/", token="nope")

    assert response.status == 401


def test_the_wsgi_web_process_redirects_streams_to_the_events_process(client, user, settings):
    settings.EVENTS_URL = "http://127.0.0.1:8001"
    client.force_login(user)

    response = client.get("/api/v1/events/?agent=echo")

    assert response.status_code == 307
    assert response["Location"] == "http://127.0.0.1:8001/api/v1/events/?agent=echo"


def test_many_open_streams_share_one_process_without_a_thread_each(events_server):
    user = UserFactory()
    run = RunFactory(submitted_by=user)
    clients = [stream(events_server, "agent=echo", user) for _ in range(100)]
    for client in clients:
        client.subscribed()

    publish(run, "queued")

    received = []

    def read(client: EventStreamClient) -> None:
        received.append(client.next_event().data["run"])

    readers = [threading.Thread(target=read, args=(client,)) for client in clients]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert received == [str(run.pk)] * 100
    threads = int(Path(f"/proc/{events_server.pid}/status").read_text().split("Threads:")[1].split()[0])
    # Uvicorn's and the pools' own threads; no thread per stream.
    assert threads < 20
    for client in clients:
        client.close()


def test_a_run_stream_reports_failure_as_its_last_event(events_server):
    run = RunFactory()
    client = stream(events_server, f"run={run.pk}", run.submitted_by)
    client.subscribed()

    run.status = RunStatus.FAILED
    publish(run, "failed")

    assert [item.event for item in client.events_until_end()] == ["failed"]
