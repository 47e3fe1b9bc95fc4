"""Admission control: refuse work the platform cannot take in time, instead of drowning in it."""

import math
from dataclasses import dataclass

from scheduling.tiers import Tier

# Batch yields to the tiers above it: while one of them is past a share of its limit, batch is refused.
HIGHER_TIERS: dict[Tier, tuple[Tier, ...]] = {
    Tier.BATCH: (Tier.CRITICAL, Tier.STANDARD),
    Tier.STANDARD: (),
    Tier.CRITICAL: (),
}
MIN_RETRY_AFTER, MAX_RETRY_AFTER = 1, 300


class AdmissionRefused(Exception):
    """The tier (or agent) is over its backlog limit; come back after `retry_after` seconds.

    `reason`: tier_backlog, agent_backlog, user_share or batch_yield.
    """

    def __init__(self, message: str, *, retry_after: int, reason: str = "tier_backlog") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


@dataclass(frozen=True)
class Backlog:
    queued: int
    limit: int
    drain_per_second: float

    def retry_after(self, incoming: int) -> int:
        """Seconds until enough of the backlog has drained to take `incoming` more."""
        excess = max(self.queued + incoming - self.limit, 1)
        if self.drain_per_second <= 0:
            return 30
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, math.ceil(excess / self.drain_per_second)))


def admission_check(
    *, tier: Tier, incoming: int, backlogs: dict[Tier, Backlog], yield_fraction: float, label: str | None = None
) -> None:
    """Raise AdmissionRefused if `incoming` runs would put the tier over its limit, or batch must yield."""
    own = backlogs[tier]
    if own.queued + incoming > own.limit:
        raise AdmissionRefused(
            f"{label or tier.value} backlog is {own.queued} runs; the limit is {own.limit}.",
            retry_after=own.retry_after(incoming),
            reason="agent_backlog" if label else "tier_backlog",
        )
    for higher in HIGHER_TIERS[tier]:
        backlog = backlogs[higher]
        if backlog.queued > backlog.limit * yield_fraction:
            raise AdmissionRefused(
                f"batch yields while the {higher.value} backlog ({backlog.queued}) is over "
                f"{yield_fraction:.0%} of its limit.",
                retry_after=backlog.retry_after(0),
                reason="batch_yield",
            )


def share_limit(*, tier_limit: int, share: float) -> int:
    """How many queued runs of a tier one user may hold: `share` of the tier's limit, at least one."""
    return max(1, math.floor(tier_limit * share))


def share_check(*, tier: Tier, incoming: int, backlog: Backlog, share: float) -> None:
    """Raise AdmissionRefused if `incoming` runs would put one user's queued runs (`backlog`) over their share."""
    if backlog.queued + incoming > backlog.limit:
        raise AdmissionRefused(
            f"your {tier.value} backlog is {backlog.queued} runs; each user's share is {share * 100:g}% of the "
            f"tier's limit, {backlog.limit} runs.",
            retry_after=backlog.retry_after(incoming),
            reason="user_share",
        )
