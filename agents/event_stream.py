"""Following run events live: which channel a caller may read, and the events it gets from it."""

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from agentplatform import events
from agents.errors import RunRejected
from agents.models import Agent, Run, RunStatus
from agents.runs.selectors import run_visible_to

T = TypeVar("T")


@dataclass(frozen=True)
class EventStream:
    """One caller's view of the bus: its channels, whose events it may see, and when it ends."""

    channels: tuple[str, ...]
    # None: every event on the channel (staff); otherwise only the events of this user's runs.
    user_id: int | None
    # For a stream of one run: it ends with the run.
    run: Run | None = None


def event_stream_for(*, user, agent: str | None = None, run: str | None = None) -> EventStream:
    """The stream a user asked for; RunRejected for a bad filter, Run.DoesNotExist for a run they cannot see."""
    user_id = None if user.is_staff else user.pk
    if run is not None:
        try:
            run_id = uuid.UUID(run)
        except ValueError as exc:
            raise RunRejected({"run": [f"{run!r} is not a run id."]}) from exc
        found = run_visible_to(user).get(pk=run_id)
        if agent is not None and found.agent.name != agent:
            raise RunRejected({"agent": [f"Run {run_id} is a run of {found.agent.name!r}, not {agent!r}."]})
        # The run, and, for the root of a tree, every run below it (they publish on their root's tree channel).
        channels = (events.run_channel(run_id), events.tree_channel(run_id))
        return EventStream(channels=channels, user_id=user_id, run=found)
    if agent is not None:
        if not Agent.objects.filter(name=agent).exists():
            raise RunRejected({"agent": [f"Unknown agent {agent!r}."]})
        return EventStream(channels=(events.agent_channel(agent),), user_id=user_id)
    return EventStream(channels=(events.all_channel(),), user_id=user_id)


async def in_db_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run database work from a stream in a pooled thread, and give the connection back when done.

    A stream lives for hours: it must hold neither a thread nor a database connection meanwhile.
    """

    def call() -> T:
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()

    return await sync_to_async(call, thread_sensitive=False)()


async def event_stream_read(stream: EventStream, *, keepalive: float) -> AsyncIterator[dict[str, Any] | None]:
    """The stream's events from the moment it is subscribed; None after each `keepalive` seconds of quiet.

    The first item is None once the subscription is live. A run's stream starts with the run's
    current state when it has already ended, and ends after the run's final event.
    """
    # One connection per stream: async connections belong to the event loop that made them.
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=None)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(*stream.channels)
        # subscribe() only sends the command: the stream is live once Redis confirms every channel.
        confirmed = 0
        while confirmed < len(stream.channels):
            confirmed += (await pubsub.get_message(timeout=keepalive) or {}).get("type") == "subscribe"
        # Read after the subscription stands, so that whatever happens to the run later reaches us.
        if stream.run is not None:
            await in_db_thread(stream.run.refresh_from_db, fields=["status", "attempts"])
        yield None
        if stream.run is not None and stream.run.is_terminal:
            yield events.event_of_run(stream.run, str(stream.run.status))
            return
        quiet_since = time.monotonic()
        while True:
            # Other users' events are read and dropped; they do not count as the client hearing anything.
            wait = max(keepalive - (time.monotonic() - quiet_since), 0.0)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            for event in events.events_of_message(message["data"]) if message is not None else ():
                if stream.user_id is None or event.get("user") == stream.user_id:
                    yield event
                    quiet_since = time.monotonic()
                    # A run's stream also carries its tree's events: it ends with the run itself.
                    ended = event.get("run") == str(getattr(stream.run, "pk", None))
                    if ended and event.get("status") in RunStatus.terminal():
                        return
            if time.monotonic() - quiet_since >= keepalive:
                yield None
                quiet_since = time.monotonic()
    finally:
        await pubsub.aclose()
        await client.aclose()
