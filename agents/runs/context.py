"""What a running agent can reach: its run, the bus, and further runs."""

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from agentplatform import events
from agents.models import Run
from agents.runs.delegation import SIGNAL_NAME_PATTERN, Child, Delegation, children_of, then_of
from agents.runs.submit import RunRequest, run_submit

RUN_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")


class RunLogger(logging.Logger):
    """One attempt's `ctx.logger`: keeps what it logs as text, up to a byte limit, and passes every
    record on to the agent's shared logger (`agents.run.<agent>`) as before.

    Not registered with logging's manager, so a run leaves nothing behind; its level is the shared
    logger's (LOG_LEVEL by default), so the run keeps what the process would print.
    """

    def __init__(self, parent: logging.Logger, *, limit: int) -> None:
        super().__init__(parent.name)
        self.parent = parent
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0
        self._cut = False
        self._lock = threading.Lock()

    def handle(self, record: logging.LogRecord) -> None:
        self._keep(record)
        super().handle(record)

    def _keep(self, record: logging.LogRecord) -> None:
        line = RUN_LOG_FORMAT.format(record) + "\n"
        size = len(line.encode())
        with self._lock:
            if self._cut:
                return
            if self._size + size > self.limit:
                self._cut = True
                return
            self._lines.append(line)
            self._size += size

    @property
    def text(self) -> str:
        """What was kept, with a last line saying so if the limit cut the rest."""
        with self._lock:
            text = "".join(self._lines)
            return text + "[log cut: RUN_LOG_MAX_BYTES reached]\n" if self._cut else text


@dataclass
class RunContext:
    run: Run
    logger: RunLogger = field(init=False)

    def __post_init__(self) -> None:
        shared = logging.getLogger(f"agents.run.{self.run.agent.name}")
        # Earlier attempts' lines came with the claim; this attempt gets what is left of the limit.
        room = settings.RUN_LOG_MAX_BYTES - len(self.run.log.encode())
        self.logger = RunLogger(shared, limit=max(room, 0))

    @property
    def log(self) -> str:
        """The run's log after this attempt: earlier attempts' lines, then this one's under a heading."""
        earlier, text = self.run.log, self.logger.text
        if not text:
            return earlier
        if earlier or self.run.attempts > 1:
            text = f"--- attempt {self.run.attempts} ---\n{text}"
        return earlier + text

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

    def delegate(
        self,
        children: Sequence[Child | tuple[str, dict[str, Any]]],
        *,
        then: Callable[..., Any] | str,
        on_failure: str = "fail",
        state: Any = None,
    ) -> Delegation:
        """Hand work to child runs and go on when they have all ended: return what this builds.

        `children` are Child(agent, input, tier=None, cache="use") or (agent, input) pairs, inserted
        and dispatched together. `then` is a @continuation, called as `then(ctx, input, wake)` with
        `wake.children` (their outcomes, in order) and `wake.state` (`state`, JSON), or the name of an
        agent whose run gets {"children": [...], "state": ...} as input and whose outcome becomes
        this run's. With on_failure="fail" (the default) a child that does not succeed fails this run;
        with "continue", `then` sees it and decides (it may delegate again). The run holds no worker
        while it waits.
        """
        if on_failure not in ("fail", "continue"):
            raise ValueError('on_failure must be "fail" or "continue"')
        return Delegation(
            kind="children", then=then_of(then), state=state, children=children_of(children), on_failure=on_failure
        )

    def wait_for_signal(
        self, name: str, *, timeout: float, then: Callable[..., Any] | str, state: Any = None
    ) -> Delegation:
        """Wait, holding no worker, for the signal `name` posted to this run (POST /api/v1/runs/{id}/signal/),
        at most `timeout` seconds; then `then(ctx, input, wake)` gets `wake.payload`, or `wake.timed_out`."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if not SIGNAL_NAME_PATTERN.match(name):
            raise ValueError(f"signal name {name!r} must match {SIGNAL_NAME_PATTERN.pattern}")
        return Delegation(kind="signal", then=then_of(then), state=state, signal=name, seconds=timeout)

    def sleep(self, seconds: float, *, then: Callable[..., Any] | str, state: Any = None) -> Delegation:
        """Go on with `then(ctx, input, wake)` after `seconds`, holding no worker meanwhile."""
        if seconds < 0:
            raise ValueError("seconds cannot be negative")
        return Delegation(kind="timer", then=then_of(then), state=state, seconds=seconds)
