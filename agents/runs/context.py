"""What a running agent can reach: its run, the bus, and further runs."""

import logging
from dataclasses import dataclass, field
from typing import Any

from agentplatform import events
from agents.models import Run
from agents.runs.submit import RunRequest, run_submit


@dataclass
class RunContext:
    run: Run
    logger: logging.Logger = field(init=False)

    def __post_init__(self) -> None:
        self.logger = logging.getLogger(f"agents.run.{self.run.agent.name}")

    @property
    def run_id(self) -> str:
        return str(self.run.pk)

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry, …"""
        return self.run.attempts

    def publish(self, topic: str, message: Any) -> str:
        """Publish a JSON message on an agent topic; returns its id (its runs' key: `topic:<id>:<agent>`)."""
        return events.publish_topic(topic, message, run_id=self.run.pk, user=self.run.submitted_by_id)

    def submit(self, agent: str, input: dict[str, Any], *, tier: str | None = None) -> str:
        """Submit a child run on behalf of this run's submitter; returns its id."""
        child, _ = run_submit(
            user=self.run.submitted_by, request=RunRequest(agent=agent, input=input, tier=tier), parent=self.run
        )
        return str(child.pk)
