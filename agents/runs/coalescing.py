"""Coalescing: identical runs of a cacheable agent in flight at once share one execution.

The first run of an (agent, version, input) becomes its leader: its id is stored under its
in-flight key (see inflight) once its row is committed. A later identical run follows it
(`Run.follows`): it gets no message and finishes when the leader does, with the leader's result.
Two runs submitted at the same instant may both be inserted as leaders; only one wins the key
after commit, and the other becomes a follower before it is dispatched.

When a leader fails, its followers fail with its error; when it is cancelled or expires (the
fate of one caller, not of the work), its most urgent follower takes over the work (see finish,
which settles followers whenever a leader ends). The sweeper checks every step again, so a lost
key or a crash between steps never strands a follower.
"""

import logging
from collections import defaultdict

import redis

from agents.models import Run, RunStatus
from agents.runs.finish import leaders_ended, queued_answer_from_cache
from agents.runs.inflight import leaders_in_flight, leaders_take

logger = logging.getLogger(__name__)


def runs_follow_inflight(runs: list[Run]) -> None:
    """Before insert: each run whose identical run is already in flight follows it instead of running."""
    if not runs:
        return
    try:
        leaders = leaders_in_flight(runs)
    except redis.RedisError:
        logger.exception("in-flight lookup failed; these runs execute on their own")
        return
    for run, leader in zip(runs, leaders, strict=True):
        if leader is not None:
            run.follows_id = leader
            run.escalate_at = None


def runs_lead(runs: list[Run]) -> list[Run]:
    """After commit: claim leadership of each run's input; returns the runs that lead and must be dispatched.

    A run that finds another leader in flight becomes its follower here, before any message for it exists.
    """
    if not runs:
        return []
    try:
        holders = leaders_take(runs)
    except redis.RedisError:
        logger.exception("could not claim in-flight keys; these runs execute on their own")
        return runs
    leading, following = [], defaultdict(list)
    for run, holder in zip(runs, holders, strict=True):
        if holder is None:
            leading.append(run)
        else:
            following[holder].append(run)
    for holder, followers in following.items():
        # A run cancelled meanwhile stays as it is: it has nothing left to run.
        Run.objects.filter(pk__in=[run.pk for run in followers], status=RunStatus.QUEUED, follows__isnull=True).update(
            follows_id=holder, escalate_at=None
        )
        for run in followers:
            run.follows_id = holder
    followed_settle(runs)
    # A leader stores its result before it gives up its key, so a run that took a key just given
    # up finds the result in the cache rather than computing it again.
    return queued_answer_from_cache(leading)


def followed_settle(runs: list[Run]) -> None:
    """Settle the followers among `runs` whose leader ended before they were committed or converted."""
    followed = {run.follows_id for run in runs if run.follows_id is not None}
    if followed:
        ended = Run.objects.select_related("agent").filter(pk__in=followed, status__in=RunStatus.terminal())
        leaders_ended(list(ended))
