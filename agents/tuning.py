"""The agents' tuning rows as submissions read them: each process keeps a copy for AGENT_TUNING_CACHE_SECONDS.

Every submission needs its agents' rows (tier, SLA, limits, whether enabled); reading them from the
database each time cost a single submission a round trip and the ORM's work. A change an operator makes
(admin, shell, sync) clears this process's copy at once, and reaches every other process within
AGENT_TUNING_CACHE_SECONDS. The rows are shared by the threads of a process and never modified.
"""

import threading
import time

from django.conf import settings
from django.db.models.signals import post_delete, post_save

# name -> (the row, when it was read, monotonic seconds)
_rows: dict[str, tuple[object, float]] = {}
_lock = threading.Lock()


def agents_named(names: set[str]):
    """The Agent rows of `names` that exist, by name (names with no row are left out)."""
    from agents.models import Agent

    ttl = settings.AGENT_TUNING_CACHE_SECONDS
    now = time.monotonic()
    found, missing = {}, set()
    for name in names:
        cached = _rows.get(name)
        if cached is not None and now - cached[1] < ttl:
            found[name] = cached[0]
        else:
            missing.add(name)
    if missing:
        rows = list(Agent.objects.filter(name__in=missing))
        with _lock:
            for row in rows:
                found[row.name] = row
                if ttl > 0:
                    _rows[row.name] = (row, now)
    return found


def agent_tuning_forget(**kwargs) -> None:
    """Forget this process's copy: the next submission reads the rows again."""
    with _lock:
        _rows.clear()


post_save.connect(agent_tuning_forget, sender="agents.Agent", dispatch_uid="agent_tuning_forget_on_save")
post_delete.connect(agent_tuning_forget, sender="agents.Agent", dispatch_uid="agent_tuning_forget_on_delete")
