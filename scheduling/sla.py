"""Deadlines: when a run must be finished, whether it was, and when to escalate it."""

from datetime import datetime, timedelta


def run_deadline(*, submitted_at: datetime, sla_seconds: float, requested: datetime | None = None) -> datetime:
    """submitted_at + SLA, or the caller's deadline when that is earlier."""
    deadline = submitted_at + timedelta(seconds=sla_seconds)
    return min(deadline, requested) if requested is not None else deadline


def sla_outcome(*, deadline: datetime, started_at: datetime | None, finished_at: datetime) -> tuple[bool, str]:
    """(met, the part that overran: "queue_wait", "run_time" or "" when met)."""
    if finished_at <= deadline:
        return True, ""
    if started_at is None or started_at > deadline:
        return False, "queue_wait"
    return False, "run_time"


def escalation_due(*, submitted_at: datetime, sla_seconds: float, fraction: float) -> datetime:
    """When a still-queued run should also be offered to the critical pool."""
    return submitted_at + timedelta(seconds=sla_seconds * fraction)


def escalation_room(*, pool_size: int, busy: int) -> int:
    """How many standard runs may be offered to the critical pool now: its idle processes, `busy` being the
    critical work it runs or has queued. Escalating more would make critical runs wait behind them."""
    return max(pool_size - busy, 0)
