"""The Redis bus: run lifecycle events on pub-sub, agent topics on Redis Streams.

A run event is one JSON object, published on the run's, its agent's and the global channel:

    {"event": "succeeded", "run": "<uuid>", "agent": "echo", "tier": "standard",
     "status": "succeeded", "attempt": 1, "user": 7, "parent": null, "root": null,
     "at": "2026-11-27T19:44:28.123456+00:00"}

`event` is one of queued, started, retrying, waiting, succeeded, failed, cancelled, expired; `user`
is the id of the run's submitter (null for runs nobody submitted, such as topic runs without an
origin); `parent` and `root` name the run's parent and the top of its tree (null for a run on its
own). An event of a run in a tree is also published on its root's tree channel, apart from the
root's own channel: a client waiting for the root's end does not hear every run below it.
Events published together travel as one JSON array per tree, agent and global channel (a run's own
channel always carries them one by one): `events_of_message` reads either.

Events may be lost (a waiter reads the run row again). Topic messages may not: each is appended, as
the field `envelope` of an entry, to the topic's stream, which the dispatchers' consumer group reads
(agents/topics.py). An envelope: {"id": "<uuid>", "topic": "<name>", "message": <JSON>,
"run": "<uuid of the publishing run, or null>", "user": <its submitter's id, or null>, "at": "…"}.
"""

import functools
import json
import logging
import re
import uuid
from collections.abc import Iterable
from typing import Any

import redis
from django.conf import settings
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key

logger = logging.getLogger(__name__)

# The most events one message on a shared channel carries: a subscriber reads each message whole.
EVENTS_PER_MESSAGE = 500
RUN_EVENTS = ("queued", "started", "retrying", "waiting", "succeeded", "failed", "cancelled", "expired")
TOPIC_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
# The one consumer group of every topic stream: the platform's dispatchers share its messages.
TOPIC_GROUP = "dispatchers"
# The field of a stream entry that holds the envelope.
TOPIC_FIELD = "envelope"

# Appends an envelope to a topic's stream and trims the stream, in one step. The dispatchers' group is
# created with the stream, from its first entry on, so that a message published before any dispatcher
# ever started is delivered when one does. Age is measured on the new entry's id, Redis's own clock.
# KEYS[1]: the stream; ARGV: the group, the entry's field and its envelope, the length kept (0: any) and
# the age kept in ms (0: any).
PUBLISH_TOPIC_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
local id
if tonumber(ARGV[4]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', ARGV[2], ARGV[3])
else
  id = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[3])
end
local age = tonumber(ARGV[5])
local now = tonumber(string.match(id, '^(%d+)'))
if age > 0 and now > age then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d', now - age))
end
return id
"""


class InvalidTopic(ValueError):
    """A topic name that the bus does not carry."""


def run_channel(run_id: object) -> str:
    return redis_key("events", "run", run_id)


def tree_channel(root_id: object) -> str:
    """The events of every run below the root `root_id` (the root's own go on its run channel)."""
    return redis_key("events", "tree", root_id)


def agent_channel(agent: str) -> str:
    return redis_key("events", "agent", agent)


def all_channel() -> str:
    return redis_key("events", "all")


def cancel_channel() -> str:
    """Run ids being cancelled; every worker process listens to interrupt the one it is running."""
    return redis_key("control", "cancel")


def topic_stream(topic: str) -> str:
    """The Redis Stream that carries a topic's messages; InvalidTopic for a name the bus does not carry."""
    if not TOPIC_PATTERN.match(topic):
        raise InvalidTopic(f"topic {topic!r} must match {TOPIC_PATTERN.pattern}")
    return redis_key("stream", "topic", topic)


def run_event(
    *,
    event: str,
    run_id: object,
    agent: str,
    tier: str,
    status: str,
    attempt: int,
    user: int | None = None,
    parent: object = None,
    root: object = None,
) -> dict[str, Any]:
    if event not in RUN_EVENTS:
        raise ValueError(f"unknown run event {event!r}")
    return {
        "event": event,
        "run": str(run_id),
        "agent": agent,
        "tier": tier,
        "status": status,
        "attempt": attempt,
        "user": user,
        "parent": str(parent) if parent else None,
        "root": str(root) if root else None,
        "at": timezone.now().isoformat(),
    }


def event_of_run(run: Any, event: str) -> dict[str, Any]:
    """The event for a run row, as it stands."""
    return run_event(
        event=event, run_id=run.pk, agent=run.agent.name, tier=run.tier, status=run.status, attempt=run.attempts,
        user=run.submitted_by_id, parent=run.parent_id, root=run.root,
    )  # fmt: skip


def publish_run_events(events: Iterable[dict[str, Any]], *, pipe: redis.client.Pipeline | None = None) -> None:
    """Publish run events on their run, agent and global channels in one round trip.

    With `pipe`, the publishes go with the commands already queued on it, in the same round trip.
    Best effort: the run row is the truth and is already written, so a Redis failure is logged,
    not raised; a waiter that misses an event finds the outcome when it reads the row again.
    """
    pipe = pipe if pipe is not None else redis_client().pipeline(transaction=False)
    queue_run_events(pipe, events)
    try:
        pipe.execute()
    except redis.RedisError:
        logger.exception("could not publish run events")


def queue_run_events(pipe: redis.client.Pipeline, events: Iterable[dict[str, Any]], *, new: bool = False) -> None:
    """Queue the publishes of run events on `pipe`, for the caller to send with its own commands.

    Events published together share one message per shared channel (tree, agent, global), a JSON
    array of them (see `events_of_message`): a batch of a thousand runs is a few publishes, not
    thousands. Each run's own channel still gets its events one by one, after the shared ones, so
    that whoever follows a tree hears the runs below the root before the root's own end.

    `new`: the runs were created just now, so nobody can be listening on their own channels yet (their ids
    are not out): those publishes are left out.
    """
    shared: dict[str, list[str]] = {}
    own: list[tuple[str, str]] = []
    for event in events:
        payload = json.dumps(event)
        if not new:
            own.append((run_channel(event["run"]), payload))
        if event.get("root"):
            # A channel of its own: whoever waits on the root alone does not hear every run below it.
            shared.setdefault(tree_channel(event["root"]), []).append(payload)
        shared.setdefault(agent_channel(event["agent"]), []).append(payload)
        shared.setdefault(all_channel(), []).append(payload)
    for channel, payloads in shared.items():
        for start in range(0, len(payloads), EVENTS_PER_MESSAGE):
            chunk = payloads[start : start + EVENTS_PER_MESSAGE]
            pipe.publish(channel, chunk[0] if len(chunk) == 1 else f"[{','.join(chunk)}]")
    for channel, payload in own:
        pipe.publish(channel, payload)


def events_of_message(data: bytes | str) -> list[dict[str, Any]]:
    """The run events one message on an event channel carries: one object, or an array published together."""
    decoded = json.loads(data)
    return decoded if isinstance(decoded, list) else [decoded]


def publish_cancel(run_id: object) -> None:
    """Tell every worker process that the run is cancelled (best effort, like run events)."""
    publish_cancels([run_id])


def publish_cancels(run_ids: Iterable[object]) -> None:
    """Tell every worker process that these runs are cancelled, a message each, in one round trip."""
    named = [str(run_id) for run_id in run_ids]
    if not named:
        return
    pipe = redis_client().pipeline(transaction=False)
    for run_id in named:
        pipe.publish(cancel_channel(), run_id)
    try:
        pipe.execute()
    except redis.RedisError:
        logger.exception("could not publish the cancellation of %d runs", len(named))


def topic_envelope(topic: str, message: Any, *, run_id: object = None, user: int | None = None) -> dict[str, Any]:
    """A message as it travels on a topic: with an id (so each is acted on once) and its origin."""
    return {
        "id": str(uuid.uuid4()),
        "topic": topic,
        "message": message,
        "run": str(run_id) if run_id is not None else None,
        "user": user,
        "at": timezone.now().isoformat(),
    }


def publish_topic(topic: str, message: Any, *, run_id: object = None, user: int | None = None) -> str:
    """Append a JSON message to an agent topic's stream; returns the message's id (the envelope's).

    The message waits in the stream until a dispatcher has stored the runs it starts, however long no
    dispatcher runs, within the stream's bounds (TOPIC_STREAM_MAXLEN, TOPIC_STREAM_MAX_AGE_SECONDS).
    Raises InvalidTopic for a bad topic name and TypeError for a message that is not JSON.
    """
    stream = topic_stream(topic)
    envelope = topic_envelope(topic, message, run_id=run_id, user=user)
    _publish_script(redis_client())(
        keys=[stream],
        args=[
            TOPIC_GROUP,
            TOPIC_FIELD,
            json.dumps(envelope),
            settings.TOPIC_STREAM_MAXLEN,
            int(settings.TOPIC_STREAM_MAX_AGE_SECONDS * 1000),
        ],
    )
    return envelope["id"]


@functools.lru_cache(maxsize=4)
def _publish_script(client: redis.Redis) -> redis.commands.core.Script:
    # Sent by its SHA1 (EVALSHA): one round trip, the script's text only the first time a server sees it.
    return client.register_script(PUBLISH_TOPIC_SCRIPT)
