"""List recent runs in the terminal, and with `--follow` print their events as they happen until Ctrl-C.

Runs are those the user sees in the API (`--user`, by default the first active staff user, who sees
every run), newest first, filtered by agent, status and tier. Events come from the Redis bus: the
agent's channel with `--agent`, the global one otherwise, filtered by tier and status here.
"""

from collections.abc import Iterable
from typing import Any

import redis
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.management.commands.submit import command_user
from agents.models import Agent, Run, RunStatus
from agents.runs.selectors import run_list
from scheduling.tiers import Tier

# How long one read of the bus may block: Ctrl-C is noticed between reads.
FOLLOW_READ_SECONDS = 1.0
COLUMNS = ("ID", "AGENT", "TIER", "STATUS", "SUBMITTED", "WAIT MS", "RUN MS", "NOTE")


def _note(run: Run) -> str:
    if run.cached:
        return "cached"
    if run.follows_id is not None:
        return f"follows {run.follows_id}"
    return ""


def runs_table(runs: Iterable[Run]) -> list[str]:
    """The runs as lines of a table with a header, columns aligned."""
    rows = [COLUMNS] + [
        (
            str(run.pk),
            run.agent.name,
            run.tier,
            run.status,
            run.submitted_at.strftime("%Y-%m-%d %H:%M:%S"),
            "" if run.queue_wait_ms is None else str(run.queue_wait_ms),
            "" if run.run_ms is None else str(run.run_ms),
            _note(run),
        )
        for run in runs
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def event_line(event: dict[str, Any]) -> str:
    """One run event as a line: when, what, which run of which agent and tier, which attempt."""
    return (
        f"{event.get('at', '')}  {event.get('event', ''):<9}  {event.get('run', '')}  "
        f"{event.get('agent', '')}  {event.get('tier', '')}  attempt {event.get('attempt', '')}"
    )


class Command(BaseCommand):
    help = "List recent runs, newest first; with --follow, then print run events as they happen until Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--agent", help="Only runs of this agent.")
        parser.add_argument("--status", choices=RunStatus.values, help="Only runs with this status.")
        parser.add_argument("--tier", choices=Tier.values, help="Only runs of this tier.")
        parser.add_argument("--limit", type=int, default=20, help="How many runs to list (default 20; 0: none).")
        parser.add_argument("--user", help="List as this user sees runs (default: the first active staff user).")
        parser.add_argument("--follow", action="store_true", help="Then print run events until interrupted.")

    def handle(self, *args: Any, agent: str | None, status: str | None, tier: str | None, **options: Any) -> None:
        if options["limit"] < 0:
            raise CommandError("--limit must be 0 or more.")
        if agent is not None and not Agent.objects.filter(name=agent).exists():
            raise CommandError(f"Unknown agent {agent!r}.")
        user = command_user(options["user"])
        if options["limit"]:
            runs = list(run_list(user=user, agent=agent, status=status, tier=tier)[: options["limit"]])
            for line in runs_table(runs) if runs else ["No runs."]:
                self.stdout.write(line)
        if options["follow"]:
            self._follow(user=user, agent=agent, status=status, tier=tier)

    def _follow(self, *, user, agent: str | None, status: str | None, tier: str | None) -> None:
        channel = events.agent_channel(agent) if agent else events.all_channel()
        pubsub = redis_client().pubsub()
        try:
            pubsub.subscribe(channel)
            # The subscription is confirmed before anything is said to follow: no event is missed after it.
            while pubsub.get_message(timeout=FOLLOW_READ_SECONDS) is None:
                pass
            self.stderr.write("Following run events (Ctrl-C to stop).")
            while True:
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=FOLLOW_READ_SECONDS)
                if message is None:
                    continue
                for event in events.events_of_message(message["data"]):
                    if not user.is_staff and event.get("user") != user.pk:
                        continue
                    if (tier and event.get("tier") != tier) or (status and event.get("status") != status):
                        continue
                    self.stdout.write(event_line(event))
                self.stdout.flush()
        except KeyboardInterrupt:
            return
        except redis.RedisError as exc:
            raise CommandError(f"Cannot follow events: Redis did not answer ({type(exc).__name__}).") from exc
        finally:
            pubsub.close()
