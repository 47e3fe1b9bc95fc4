"""The topic dispatcher: one run of each reacting agent per message published on an agent topic.

Agents declare the topics they react to (`@agent(topics=[...])`); `ctx.publish(topic, message)`
appends an envelope to the topic's Redis Stream (see agentplatform/events.py). Dispatcher processes
read the stream of every declared topic through one consumer group, so that each message goes to one
of them, which submits, for each reacting agent, one run whose input is the message, on behalf of
the publishing run's submitter and as that run's child, and only then acknowledges the message.

Messages are not lost: published while no dispatcher runs, a message waits in its stream; held by a
dispatcher that died before acknowledging it, it is claimed by another (XAUTOCLAIM) once it has
been idle for TOPIC_CLAIM_IDLE_SECONDS. A message delivered twice starts its runs once: each run's
idempotency key is `topic:<message id>:<agent>`, so a second delivery finds the first run. A
message that is not a valid envelope, or whose content an agent's input schema refuses, is logged,
counted as bad and acknowledged; it never stops the dispatcher. A message whose runs could not all
be stored (the database did not answer) is not acknowledged: it is claimed again and the runs
missing are submitted then.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections

from agentplatform.events import TOPIC_FIELD, TOPIC_GROUP, topic_stream
from agentplatform.redis_client import redis_client, redis_key
from agents.errors import IdempotencyConflict, RunRejected
from agents.models import Run
from agents.registry import registry
from agents.runs.submit import RunRequest, run_submit
from scheduling.admission import AdmissionRefused

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0
# Entries one read or claim takes: few, so that the last of them is not left idle long enough to be
# claimed by another dispatcher while this one dispatches the first.
READ_COUNT = 10
# How long a read waits for a message, and so how soon the dispatcher notices it should stop.
READ_BLOCK_MS = 1000
# Message ids are uuids; a longer one (a hand-made entry) would not fit an idempotency key.
MESSAGE_ID_MAX_LENGTH = 64
# A user id PostgreSQL can look up (bigint); a larger one would fail the query on every delivery.
USER_ID_MAX = 2**63 - 1

# Removes the consumers of a group that hold no message and have not read for ARGV[2] ms (dispatchers
# that stopped; a live one reads every READ_BLOCK_MS), sparing ARGV[3]. Checked and removed in one
# step, so that a consumer cannot be given a message between the two.
PRUNE_CONSUMERS_SCRIPT = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""


class BadTopicMessage(ValueError):
    """A message that is not a topic envelope."""


def topic_stats_key() -> str:
    return redis_key("topics", "stats")


def topic_stats() -> dict[str, dict[str, int]]:
    """Per topic: messages received, runs submitted, bad, refused (admission), failed and duplicate messages."""
    stats: dict[str, dict[str, int]] = {}
    for field, value in redis_client().hgetall(topic_stats_key()).items():
        topic, _, counter = field.decode().rpartition(":")
        stats.setdefault(topic, {})[counter] = int(value)
    return stats


def topic_run_key(message_id: str, agent: str) -> str:
    """The idempotency key of the run that a message starts for an agent."""
    return f"topic:{message_id}:{agent}"


def topic_consumer_name() -> str:
    """This process's consumer name in the dispatchers' group: its host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _envelope(topic: str, data: bytes | str | None) -> dict[str, Any]:
    if data is None:
        raise BadTopicMessage(f"the entry has no {TOPIC_FIELD!r} field")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadTopicMessage(f"not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or "message" not in envelope or not isinstance(envelope.get("id"), str):
        raise BadTopicMessage('not an envelope {"id": "<text>", "message": …}')
    if not 0 < len(envelope["id"]) <= MESSAGE_ID_MAX_LENGTH:
        raise BadTopicMessage(f"the id must be 1 to {MESSAGE_ID_MAX_LENGTH} characters long")
    if envelope.get("topic", topic) != topic:
        raise BadTopicMessage(f"envelope names topic {envelope['topic']!r} but came on {topic!r}")
    if not isinstance(envelope["message"], dict):
        raise BadTopicMessage("the message must be a JSON object: it becomes an agent's input")
    return envelope


def _origin(envelope: dict[str, Any]) -> tuple[Any, Run | None]:
    """The user and the run the message came from, where they still exist."""
    parent = None
    try:
        if envelope.get("run"):
            parent = Run.objects.select_related("submitted_by").filter(pk=uuid.UUID(str(envelope["run"]))).first()
    except ValueError:
        parent = None
    if parent is not None:
        return parent.submitted_by, parent
    user = envelope.get("user")
    known = isinstance(user, int) and not isinstance(user, bool) and 0 < user <= USER_ID_MAX
    return (get_user_model().objects.filter(pk=user).first() if known else None), None


def topic_message_dispatch(
    topic: str, data: bytes | str | None, *, agents: list[str], entry_id: bytes | str | None = None
) -> Counter:
    """Submit one run of each agent for a message received on `topic`; returns what happened, counted.

    `entry_id`, the message's entry in the topic's stream, is acknowledged once every run the message
    starts is stored (or refused for good); a message whose run could not be stored stays pending.
    """
    outcome = Counter(received=1)
    try:
        envelope = _envelope(topic, data)
    except BadTopicMessage as exc:
        logger.warning("bad message on topic %s: %s", topic, exc)
        outcome["bad"] += 1
        return _counted(topic, outcome, ack=entry_id)
    user, parent = _origin(envelope)
    for agent in agents:
        request = RunRequest(
            agent=agent, input=envelope["message"], idempotency_key=topic_run_key(envelope["id"], agent)
        )
        try:
            # A reaction to a message is the publisher's child, but keeps its own tier, deadline and expiry.
            run, created = run_submit(user=user, request=request, parent=parent, inherits=False)
        except IdempotencyConflict:
            # The key names this message's run of this agent, stored when the agent read the message
            # otherwise (another version): the message already has its run.
            outcome["duplicate"] += 1
        except RunRejected as exc:
            logger.warning("message %s on topic %s refused by %s: %s", envelope["id"], topic, agent, exc.errors)
            outcome["bad"] += 1
        except AdmissionRefused as exc:
            logger.warning("message %s on topic %s not run by %s: %s", envelope["id"], topic, agent, exc)
            outcome["refused"] += 1
        except Exception:
            # The message was fine; this agent's run was not stored (the database, say), so the message
            # is delivered again later, and the other agents get theirs now.
            logger.exception("message %s on topic %s: no run of %s", envelope["id"], topic, agent)
            outcome["failed"] += 1
        else:
            if created:
                logger.info("message %s on topic %s: run %s of %s", envelope["id"], topic, run.pk, agent)
                outcome["submitted"] += 1
            else:
                outcome["duplicate"] += 1
    return _counted(topic, outcome, ack=None if outcome["failed"] else entry_id)


def _counted(topic: str, outcome: Counter, *, ack: bytes | str | None = None) -> Counter:
    """Add the outcome to the topic's counts and acknowledge the entry `ack`, in one round trip."""
    try:
        pipe = redis_client().pipeline(transaction=False)
        for counter, n in outcome.items():
            pipe.hincrby(topic_stats_key(), f"{topic}:{counter}", n)
        if ack is not None:
            pipe.xack(topic_stream(topic), TOPIC_GROUP, ack)
        pipe.execute()
    except redis.RedisError:
        # Unacknowledged, the message is delivered again later and finds the runs it started.
        logger.exception("could not count (or acknowledge) a message of topic %s", topic)
    return outcome


def topic_groups_create(topics: list[str]) -> None:
    """Create the dispatchers' group on each topic's stream where it is missing, from the stream's first entry.

    Publishing creates it with the stream; this covers a group lost since (Redis emptied while a
    dispatcher ran, an operator's XGROUP DESTROY): every message the stream still holds is delivered.
    """
    client = redis_client()
    for topic in topics:
        try:
            client.xgroup_create(topic_stream(topic), TOPIC_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def topic_pending_claim(topic: str, *, agents: list[str], consumer: str) -> int:
    """Claim and dispatch the messages of `topic` left unacknowledged for TOPIC_CLAIM_IDLE_SECONDS.

    Those are the messages of a dispatcher that died, or this one's whose runs could not be stored.
    Returns how many were claimed. Also removes the group's consumers that stopped holding nothing.
    """
    client = redis_client()
    stream = topic_stream(topic)
    idle_ms = int(settings.TOPIC_CLAIM_IDLE_SECONDS * 1000)
    claimed, cursor = 0, "0-0"
    while True:
        cursor, entries, deleted = client.xautoclaim(
            stream, TOPIC_GROUP, consumer, idle_ms, start_id=cursor, count=READ_COUNT
        )
        if deleted:
            logger.warning(
                "%d pending messages of topic %s were trimmed before their runs were stored", len(deleted), topic
            )
        for entry_id, fields in entries:
            claimed += 1
            _handle(topic, entry_id, fields, agents)
        if cursor in (b"0-0", "0-0"):
            break
    if claimed:
        logger.info("claimed %d unacknowledged messages of topic %s", claimed, topic)
    client.register_script(PRUNE_CONSUMERS_SCRIPT)(keys=[stream], args=[TOPIC_GROUP, idle_ms, consumer])
    return claimed


def topic_dispatcher_serve(stop: threading.Event, *, ready: threading.Event | None = None) -> None:
    """Dispatch messages of every declared topic until `stop` is set; reconnects when Redis goes away.

    Claims unacknowledged messages on start and every TOPIC_CLAIM_INTERVAL_SECONDS.
    """
    reacting = registry.reacting_to()
    streams = {topic_stream(topic): topic for topic in reacting}
    consumer = topic_consumer_name()
    if not streams:
        logger.info("no agent reacts to a topic; the dispatcher idles")
    while not stop.is_set():
        try:
            topic_groups_create(list(reacting))
            logger.info("dispatching topics %s as %s", ", ".join(sorted(reacting)) or "(none)", consumer)
            if ready is not None:
                ready.set()
            claim_due = 0.0
            while not stop.is_set():
                if not streams:
                    stop.wait(1.0)
                    continue
                if time.monotonic() >= claim_due:
                    for topic, agents in reacting.items():
                        topic_pending_claim(topic, agents=agents, consumer=consumer)
                    claim_due = time.monotonic() + settings.TOPIC_CLAIM_INTERVAL_SECONDS
                read = redis_client().xreadgroup(
                    TOPIC_GROUP, consumer, dict.fromkeys(streams, ">"), count=READ_COUNT, block=READ_BLOCK_MS
                )
                for stream, entries in read or []:
                    topic = streams[stream.decode()]
                    for entry_id, fields in entries:
                        _handle(topic, entry_id, fields, reacting[topic])
        except redis.RedisError:
            logger.exception("lost Redis; reading the topics again in %.0fs", RECONNECT_SECONDS)
            stop.wait(RECONNECT_SECONDS)


def _handle(topic: str, entry_id: bytes, fields: dict[bytes, bytes] | None, agents: list[str]) -> None:
    close_old_connections()
    try:
        topic_message_dispatch(topic, (fields or {}).get(TOPIC_FIELD.encode()), agents=agents, entry_id=entry_id)
    except Exception:
        # A message must never stop the dispatcher, whatever it holds or whatever the database says;
        # unacknowledged, it is claimed again later.
        logger.exception("message %s on topic %s could not be dispatched", entry_id, topic)
        _counted(topic, Counter(received=1, failed=1))
    finally:
        close_old_connections()
