"""The topic dispatcher: one run of each reacting agent per message published on an agent topic.

Agents declare the topics they react to (`@agent(topics=[...])`); `ctx.publish(topic, message)`
publishes an envelope (see agentplatform/events.py). The dispatcher process subscribes to every
declared topic and submits, for each message and each reacting agent, one run whose input is the
message, on behalf of the publishing run's submitter and as that run's child.

A message id is acted on once per agent, even with several dispatchers running. A message that is
not a valid envelope, or whose content an agent's input schema refuses, is logged and counted as
bad; it never stops the dispatcher. Pub-sub keeps nothing: messages published while no dispatcher
listens are not delivered (use `ctx.submit` for work that must not be lost).
"""

import json
import logging
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections

from agentplatform.events import topic_channel
from agentplatform.redis_client import redis_client, redis_key
from agents.errors import RunRejected
from agents.models import Run
from agents.registry import registry
from agents.runs.submit import RunRequest, run_submit
from scheduling.admission import AdmissionRefused

logger = logging.getLogger(__name__)

RECONNECT_SECONDS = 1.0


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


def _envelope(topic: str, data: bytes | str) -> dict[str, Any]:
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadTopicMessage(f"not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or "message" not in envelope or not isinstance(envelope.get("id"), str):
        raise BadTopicMessage('not an envelope {"id": "<text>", "message": …}')
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
    return (get_user_model().objects.filter(pk=user).first() if isinstance(user, int) else None), None


def topic_message_dispatch(topic: str, data: bytes | str, *, agents: list[str]) -> Counter:
    """Submit one run of each agent for a message received on `topic`; returns what happened, counted."""
    outcome = Counter(received=1)
    try:
        envelope = _envelope(topic, data)
    except BadTopicMessage as exc:
        logger.warning("bad message on topic %s: %s", topic, exc)
        outcome["bad"] += 1
        return _counted(topic, outcome)
    user, parent = _origin(envelope)
    for agent in agents:
        seen = redis_key("topics", "seen", envelope["id"], agent)
        if not redis_client().set(seen, 1, nx=True, ex=settings.TOPIC_DEDUPE_SECONDS):
            outcome["duplicate"] += 1
            continue
        try:
            run, _ = run_submit(user=user, request=RunRequest(agent=agent, input=envelope["message"]), parent=parent)
        except RunRejected as exc:
            logger.warning("message %s on topic %s refused by %s: %s", envelope["id"], topic, agent, exc.errors)
            outcome["bad"] += 1
        except AdmissionRefused as exc:
            logger.warning("message %s on topic %s not run by %s: %s", envelope["id"], topic, agent, exc)
            outcome["refused"] += 1
        except Exception:
            # The message was fine; this agent's run was not stored (the database, say), so another
            # dispatcher may still take it, and the other agents get theirs.
            logger.exception("message %s on topic %s: no run of %s", envelope["id"], topic, agent)
            redis_client().delete(seen)
            outcome["failed"] += 1
        else:
            logger.info("message %s on topic %s: run %s of %s", envelope["id"], topic, run.pk, agent)
            outcome["submitted"] += 1
    return _counted(topic, outcome)


def _counted(topic: str, outcome: Counter) -> Counter:
    try:
        pipe = redis_client().pipeline(transaction=False)
        for counter, n in outcome.items():
            pipe.hincrby(topic_stats_key(), f"{topic}:{counter}", n)
        pipe.execute()
    except redis.RedisError:
        logger.exception("could not count messages of topic %s", topic)
    return outcome


def topic_dispatcher_serve(stop: threading.Event, *, subscribed: threading.Event | None = None) -> None:
    """Dispatch messages of every declared topic until `stop` is set; reconnects when Redis goes away."""
    reacting = registry.reacting_to()
    channels = {topic_channel(topic): topic for topic in reacting}
    if not channels:
        logger.info("no agent reacts to a topic; the dispatcher idles")
    while not stop.is_set():
        pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
        try:
            if channels:
                pubsub.subscribe(*channels)
            logger.info("dispatching topics %s", ", ".join(sorted(reacting)) or "(none)")
            if subscribed is not None:
                subscribed.set()
            while not stop.is_set():
                if not channels:
                    stop.wait(1.0)
                    continue
                message = pubsub.get_message(timeout=1.0)
                if message:
                    _handle(channels[message["channel"].decode()], message["data"], reacting)
        except redis.RedisError:
            logger.exception("lost Redis; subscribing again in %.0fs", RECONNECT_SECONDS)
            time.sleep(RECONNECT_SECONDS)
        finally:
            pubsub.close()


def _handle(topic: str, data: bytes, reacting: dict[str, list[str]]) -> None:
    close_old_connections()
    try:
        topic_message_dispatch(topic, data, agents=reacting[topic])
    except Exception:
        # A message must never stop the dispatcher, whatever it holds or whatever the database says.
        logger.exception("message on topic %s could not be dispatched", topic)
        _counted(topic, Counter(received=1, bad=1))
    finally:
        close_old_connections()
