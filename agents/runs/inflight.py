"""The Redis keys that name the leader of an input in flight (see coalescing for how they are used).

`<prefix>inflight:<agent>:<version>:<tier>:<sha256 of input>` holds the id of the run that
executes that input on that tier; identical runs follow it instead of running.
"""

import logging
from collections.abc import Iterable
from datetime import timedelta
from itertools import islice

import redis
from django.db.models import Q
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Run, RunStatus
from caching.results import input_hash
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

# Deletes the key only while it still names this leader.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Names ARGV[1] the leader if the key is free or still names the ended leader ARGV[2]; else returns the holder.
TAKE_OVER = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
  return false
end
return holder
"""

# A run may follow a leader of its own tier or a more urgent one, never a less urgent one: a
# critical run must not wait for batch work. Most urgent first.
FOLLOWABLE_TIERS: dict[Tier, tuple[Tier, ...]] = {
    Tier.CRITICAL: (Tier.CRITICAL,),
    Tier.STANDARD: (Tier.CRITICAL, Tier.STANDARD),
    Tier.BATCH: (Tier.CRITICAL, Tier.STANDARD, Tier.BATCH),
}
# A leader that succeeded this recently may still hold its key: a run that finds it shares its result.
JUST_SUCCEEDED = timedelta(seconds=60)


def inflight_key(run: Run, tier: Tier | None = None) -> str:
    """The key naming the leader of the run's input on its tier (or on `tier`)."""
    return redis_key("inflight", run.agent.name, run.agent_version, tier or Tier(run.tier), input_hash(run.input))


def key_ttl(run: Run) -> int:
    """Long enough for the leader to wait its turn and use all its attempts; a lost key only costs a duplicate."""
    return int(run.sla_seconds + run.time_limit * (run.max_retries + 1)) + 60


def leaders_in_flight(runs: list[Run]) -> list[str | None]:
    """For each run, the most urgent live leader of its input on a tier it may follow, or None."""
    keys = [[inflight_key(run, tier) for tier in FOLLOWABLE_TIERS[Tier(run.tier)]] for run in runs]
    found = iter(redis_client().mget([key for run_keys in keys for key in run_keys]))
    candidates = [[value.decode() for value in islice(found, len(run_keys)) if value is not None] for run_keys in keys]
    live = followable({leader for run_leaders in candidates for leader in run_leaders})
    return [next((leader for leader in run_leaders if leader in live), None) for run_leaders in candidates]


def leaders_take(runs: list[Run]) -> list[str | None]:
    """Claim each run's key; returns per run the live holder it must follow, or None where it leads now.

    A key naming a leader that already ended (its release was lost) is taken over.
    """
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    for run in runs:
        pipe.set(inflight_key(run), str(run.pk), nx=True, get=True, ex=key_ttl(run))
    holders = [holder.decode() if holder is not None else None for holder in pipe.execute()]
    live = followable({holder for holder in holders if holder is not None})
    for index, (run, holder) in enumerate(zip(runs, holders, strict=True)):
        if holder == str(run.pk):
            holders[index] = None
        elif holder is not None and holder not in live:
            holders[index] = leader_take_over(run, ended=holder)
    return holders


def leader_take_over(run: Run, *, ended: str) -> str | None:
    """Replace a key naming the ended leader `ended` with `run`; returns the live holder (None: `run` leads)."""
    holder = redis_client().eval(TAKE_OVER, 1, inflight_key(run), str(run.pk), ended, key_ttl(run))
    return None if holder is None else holder.decode()


def leaders_release(runs: Iterable[Run]) -> None:
    """Give up the keys of leaders that ended (each only while it still names that leader)."""
    pipe = redis_client().pipeline(transaction=False)
    for run in runs:
        pipe.eval(RELEASE, 1, inflight_key(run), str(run.pk))
    try:
        pipe.execute()
    except redis.RedisError:
        # A key left behind names an ended leader: the next identical run takes it over.
        logger.exception("could not release in-flight keys")


def followable(run_ids: set[str]) -> set[str]:
    """The runs a new identical run may follow: in flight, or succeeded (its followers share the result at once)."""
    if not run_ids:
        return set()
    in_flight = Q(status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
    just_succeeded = Q(status=RunStatus.SUCCEEDED, finished_at__gte=timezone.now() - JUST_SUCCEEDED)
    runs = Run.objects.filter(in_flight | just_succeeded, pk__in=run_ids)
    return {str(pk) for pk in runs.values_list("pk", flat=True)}
