"""When a failed attempt is tried again."""

import random

from django.conf import settings


def retry_delay(attempt: int, *, base: float | None = None, cap: float | None = None) -> float:
    """Seconds to wait before the attempt after `attempt` (1-based): exponential backoff, equal jitter.

    Half of the exponential step is kept so that retries keep backing off; the other half is
    random so that runs failing together do not come back together.
    """
    base = settings.RETRY_BACKOFF_BASE_SECONDS if base is None else base
    cap = settings.RETRY_BACKOFF_MAX_SECONDS if cap is None else cap
    step = min(cap, base * 2 ** max(attempt - 1, 0))
    return step / 2 + random.uniform(0, step / 2)
