"""The run-event bus on Redis: how events published together reach each channel."""

import uuid
from collections.abc import Iterator

import pytest

from agentplatform import events
from agentplatform.redis_client import redis_client


def event(n: int, *, run: str | None = None, root: str | None = None) -> dict:
    return events.run_event(
        event="queued", run_id=run or uuid.uuid4(), agent="echo", tier="standard", status="queued", attempt=n,
        root=root,
    )  # fmt: skip


@pytest.fixture
def heard() -> Iterator:
    """Subscribes to channels, then gives every message they got as (channel, its events)."""
    pubsub = redis_client().pubsub()

    def subscribe(*channels: str) -> None:
        pubsub.subscribe(*channels)
        assert [pubsub.get_message(timeout=5)["type"] for _ in channels] == ["subscribe"] * len(channels)

    def messages() -> list[tuple[str, list[dict]]]:
        got = []
        while (message := pubsub.get_message(timeout=0.5)) is not None:
            got.append((message["channel"].decode(), events.events_of_message(message["data"])))
        return got

    yield subscribe, messages
    pubsub.close()


def test_events_published_together_share_one_message_per_shared_channel_up_to_its_size(heard):
    subscribe, messages = heard
    root = str(uuid.uuid4())
    subscribe(events.agent_channel("echo"), events.all_channel(), events.tree_channel(root))
    published = [event(n, root=root) for n in range(events.EVENTS_PER_MESSAGE + 1)]

    events.publish_run_events(published)

    got = messages()
    for channel in (events.tree_channel(root), events.agent_channel("echo"), events.all_channel()):
        sizes = [len(items) for name, items in got if name == channel]
        assert sizes == [events.EVENTS_PER_MESSAGE, 1]
        assert [item for name, items in got if name == channel for item in items] == published


def test_a_runs_own_channel_carries_its_events_one_message_each(heard):
    subscribe, messages = heard
    run = str(uuid.uuid4())
    subscribe(events.run_channel(run))

    first, other, second = event(1, run=run), event(2), event(3, run=run)

    events.publish_run_events([first, other, second])

    assert messages() == [(events.run_channel(run), [first]), (events.run_channel(run), [second])]
