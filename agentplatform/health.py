"""Readiness: whether this process can serve, and the platform can run what it accepts.

Ready means the database and Redis answer, and at least one worker answers for each tier's queue and
for housekeeping (without it nothing recovers lost runs or fires schedules). Each check runs in a
thread of its own and is given up after READY_TIMEOUT_SECONDS, so that a server that hangs instead
of refusing cannot hold a probe. A failure is named by its exception's type alone: messages can
carry host names and users, and the probe answers anyone. The details go to the log.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connection

from agentplatform.celery import HOUSEKEEPING_QUEUE, app
from agentplatform.redis_client import redis_client
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

OK = "ok"
# The queues that must each have a worker answering.
REQUIRED_QUEUES = (*(tier.queue for tier in Tier), HOUSEKEEPING_QUEUE)


@dataclass(frozen=True)
class Readiness:
    """Each check's outcome: "ok", or what went wrong (for workers, one outcome per queue)."""

    checks: dict[str, str | dict[str, str]]

    @property
    def failed(self) -> list[str]:
        """The checks that failed, as `database`, `redis` or `workers.<queue>`."""
        names = []
        for name, outcome in self.checks.items():
            if isinstance(outcome, dict):
                names += [f"{name}.{queue}" for queue, result in outcome.items() if result != OK]
            elif outcome != OK:
                names.append(name)
        return names

    @property
    def ready(self) -> bool:
        return not self.failed


def _failure(what: str, exc: BaseException) -> str:
    logger.warning("readiness: %s failed: %r", what, exc)
    return f"failed ({type(exc).__name__})"


def database_check() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return OK
    except Exception as exc:
        return _failure("the database", exc)
    finally:
        # This thread's connection (a pooled one goes back to the pool).
        connection.close()


def redis_check() -> str:
    try:
        redis_client().ping()
        return OK
    except Exception as exc:
        return _failure("Redis", exc)


def workers_check(*, timeout: float) -> dict[str, str]:
    """For each required queue: "ok" if a worker consuming it answered within `timeout` seconds."""
    try:
        # Replies are gathered until none has come for `timeout` seconds.
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:
        failure = _failure("asking the workers", exc)
        return dict.fromkeys(REQUIRED_QUEUES, failure)
    served = {queue["name"] for queues in replies.values() if isinstance(queues, list) for queue in queues}
    return {queue: OK if queue in served else f"no worker answered within {timeout:g}s" for queue in REQUIRED_QUEUES}


def readiness_check(*, timeout: float) -> Readiness:
    """Run every check at once; a check that has not answered within `timeout` seconds fails as such."""
    late = f"no answer within {timeout:g}s"
    checks: dict[str, Callable[[], str | dict[str, str]]] = {
        "database": database_check,
        "redis": redis_check,
        # Inspecting waits for a quiet spell after the last reply: half the time leaves the other half for it.
        "workers": lambda: workers_check(timeout=timeout / 2),
    }
    results: dict[str, str | dict[str, str]] = {}

    def run(name: str, check: Callable[[], str | dict[str, str]]) -> None:
        results[name] = check()

    # Daemon threads: one stuck on a server that never answers must not keep the process from exiting.
    threads = [
        threading.Thread(target=run, args=(name, check), name=f"readiness-{name}", daemon=True)
        for name, check in checks.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0))
    outcome: dict[str, str | dict[str, str]] = {}
    for name in checks:
        if name in results:
            outcome[name] = results[name]
        else:
            logger.warning("readiness: %s did not answer within %gs", name, timeout)
            outcome[name] = dict.fromkeys(REQUIRED_QUEUES, late) if name == "workers" else late
    return Readiness(checks=outcome)
