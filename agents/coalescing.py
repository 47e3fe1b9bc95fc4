"""Coalescing: identical runs of a cacheable agent in flight at once share one execution.

The first run of an (agent, version, input) becomes its leader: its id is stored under
`<prefix>inflight:<agent>:<version>:<sha256 of input>` once its row is committed. A later
identical run follows it (`Run.follows`): it gets no message and finishes when the leader does,
with the leader's result. Two runs submitted at the same instant may both be inserted as leaders;
only one wins the key after commit, and the other becomes a follower before it is dispatched.

When a leader fails, its followers fail with its error; when it is cancelled or expires (the
fate of one caller, not of the work), its oldest follower takes over the work. Every step is
checked again by the sweeper, so a lost key or a crash between steps never strands a follower.
"""

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from itertools import islice

import redis
from django.db import transaction
from django.db.models import Case, Q, Value, When
from django.utils import timezone

from agentplatform import events
from agentplatform.redis_client import redis_client, redis_key
from agents.dispatch import run_dispatch
from agents.models import Run, RunStatus, SlaMiss
from caching.results import input_hash, result_cache_get_many
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
URGENCY = Case(When(tier=Tier.CRITICAL, then=Value(0)), When(tier=Tier.STANDARD, then=Value(1)), default=Value(2))
# A leader that succeeded this recently may still hold its key: a run that finds it shares its result.
JUST_SUCCEEDED = timedelta(seconds=60)


def inflight_key(run: Run, tier: Tier | None = None) -> str:
    """The key naming the leader of the run's input on its tier (or on `tier`)."""
    return redis_key("inflight", run.agent.name, run.agent_version, tier or Tier(run.tier), input_hash(run.input))


def _key_ttl(run: Run) -> int:
    """Long enough for the leader to wait its turn and use all its attempts; a lost key only costs a duplicate."""
    return int(run.sla_seconds + run.time_limit * (run.max_retries + 1)) + 60


def runs_follow_inflight(runs: list[Run]) -> None:
    """Before insert: each run whose identical run is already in flight follows it instead of running."""
    if not runs:
        return
    keys = [[inflight_key(run, tier) for tier in FOLLOWABLE_TIERS[Tier(run.tier)]] for run in runs]
    try:
        found = iter(redis_client().mget([key for run_keys in keys for key in run_keys]))
    except redis.RedisError:
        logger.exception("in-flight lookup failed; these runs execute on their own")
        return
    leaders = [[leader.decode() for leader in islice(found, len(run_keys)) if leader is not None] for run_keys in keys]
    followable = _followable({leader for run_leaders in leaders for leader in run_leaders})
    for run, run_leaders in zip(runs, leaders, strict=True):
        leader = next((leader for leader in run_leaders if leader in followable), None)
        if leader is not None:
            run.follows_id = leader
            run.escalate_at = None


def runs_lead(runs: list[Run]) -> list[Run]:
    """After commit: claim leadership of each run's input; returns the runs that lead and must be dispatched.

    A run that finds another leader in flight becomes its follower here, before any message for it
    exists. A key naming a leader that already ended (its release was lost) is taken over.
    """
    if not runs:
        return []
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    for run in runs:
        pipe.set(inflight_key(run), str(run.pk), nx=True, get=True, ex=_key_ttl(run))
    try:
        holders = [holder.decode() if holder is not None else None for holder in pipe.execute()]
        followable = _followable({holder for holder in holders if holder is not None})
        for index, (run, holder) in enumerate(zip(runs, holders, strict=True)):
            if holder is not None and holder not in followable:
                holders[index] = _take_key(client, run, stale=holder)
    except redis.RedisError:
        logger.exception("could not claim in-flight keys; these runs execute on their own")
        return runs
    leading, following = [], defaultdict(list)
    for run, holder in zip(runs, holders, strict=True):
        if holder is None or holder == str(run.pk):
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
    leaders_settle(runs)
    return _answered_meanwhile(leading)


def leaders_settle(runs: Iterable[Run]) -> None:
    """Settle the followers among `runs` whose leader ended before they were committed or converted."""
    followed = {run.follows_id for run in runs if run.follows_id is not None}
    if followed:
        followers_settle(Run.objects.filter(pk__in=followed))


def _followable(run_ids: set[str]) -> set[str]:
    """The runs a new identical run may follow: in flight, or succeeded (its followers share the result at once)."""
    if not run_ids:
        return set()
    in_flight = Q(status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
    just_succeeded = Q(status=RunStatus.SUCCEEDED, finished_at__gte=timezone.now() - JUST_SUCCEEDED)
    runs = Run.objects.filter(in_flight | just_succeeded, pk__in=run_ids)
    return {str(pk) for pk in runs.values_list("pk", flat=True)}


def _answered_meanwhile(leading: list[Run]) -> list[Run]:
    """Finish from the result cache the new leaders whose result was stored since they were submitted.

    A leader stores its result before it gives up its key, so a run that took a key just given up
    finds the result here rather than computing it again. Returns the leaders still to dispatch.
    """
    hits = result_cache_get_many([(run.agent.name, run.agent_version, run.input) for run in leading])
    to_run = []
    for run, hit in zip(leading, hits, strict=True):
        if hit is None:
            to_run.append(run)
            continue
        now = timezone.now()
        answered = {
            "status": RunStatus.SUCCEEDED, "result": hit.result, "cached": True, "started_at": now,
            "finished_at": now, "queue_wait_ms": 0, "run_ms": 0, "sla_met": now <= run.deadline, "escalate_at": None,
        }  # fmt: skip
        if Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(**answered):
            for field, value in answered.items():
                setattr(run, field, value)
            events.publish_run_events([events.event_of_run(run, "succeeded")])
            leader_finished(run)
    return to_run


def _take_key(client: redis.Redis, run: Run, *, stale: str) -> str | None:
    """Replace a key naming an ended leader with this run; returns the holder now (None: this run)."""
    holder = client.eval(TAKE_OVER, 1, inflight_key(run), str(run.pk), stale, _key_ttl(run))
    return None if holder is None else holder.decode()


def leader_finished(run: Run) -> None:
    """A run reached a final status: give up its in-flight key and settle the runs that followed it.

    Never raises: the run's own outcome is already recorded, and the sweeper settles followers
    that this misses.
    """
    if run.follows_id is not None or run.agent.cache_ttl <= 0:
        return
    try:
        redis_client().eval(RELEASE, 1, inflight_key(run), str(run.pk))
        followers_settle([run])
    except Exception:
        logger.exception("could not settle the followers of run %s; the sweeper will", run.pk)


def followers_settle(leaders: Iterable[Run]) -> int:
    """Finish or hand over the queued followers of each leader that reached a final status; returns how many."""
    settled = 0
    for leader in leaders:
        leader.refresh_from_db(fields=["status", "result", "error"])
        if leader.status == RunStatus.SUCCEEDED:
            settled += _followers_finish(leader, status=RunStatus.SUCCEEDED, result=leader.result, error=None)
        elif leader.status == RunStatus.FAILED:
            cause = leader.error or {}
            error = {**cause, "message": f"the run it followed ({leader.pk}) failed: {cause.get('message', '')}"}
            settled += _followers_finish(leader, status=RunStatus.FAILED, result=None, error=error)
        elif leader.status in (RunStatus.CANCELLED, RunStatus.EXPIRED):
            settled += _followers_take_over(leader)
    return settled


def _followers_finish(leader: Run, *, status: RunStatus, result, error) -> int:
    now = timezone.now()
    with transaction.atomic():
        followers = list(
            Run.objects.select_for_update()
            .filter(follows=leader, status=RunStatus.QUEUED)
            .values_list("pk", "agent__name", "tier", "attempts", "submitted_by_id")
        )
        if not followers:
            return 0
        on_time = When(deadline__gte=now, then=Value(True))
        Run.objects.filter(pk__in=[pk for pk, *_ in followers]).update(
            status=status,
            result=result,
            error=error,
            finished_at=now,
            escalate_at=None,
            sla_met=Case(on_time, default=Value(False)) if status == RunStatus.SUCCEEDED else Value(False),
            sla_miss=Case(When(deadline__lt=now, then=Value(SlaMiss.QUEUE_WAIT)), default=Value("")),
        )
    events.publish_run_events(
        events.run_event(event=status, run_id=pk, agent=agent, tier=tier, status=status, attempt=attempts, user=user)
        for pk, agent, tier, attempts, user in followers
    )
    return len(followers)


def _followers_take_over(leader: Run) -> int:
    """The most urgent, then oldest, follower of a cancelled or expired leader takes over the work.

    The others follow it: none is more urgent than the heir, so none waits on less urgent work.
    """
    while True:
        followers = Run.objects.select_related("agent").filter(follows=leader, status=RunStatus.QUEUED)
        heir = followers.order_by(URGENCY, "submitted_at").first()
        if heir is None:
            return 0
        if not Run.objects.filter(pk=heir.pk, follows=leader, status=RunStatus.QUEUED).update(follows=None):
            continue
        heir.follows_id = None
        if runs_lead([heir]):
            moved = Run.objects.filter(follows=leader, status=RunStatus.QUEUED).update(follows=heir)
            run_dispatch([heir])
            # The heir may have been cancelled before the others moved to it.
            followers_settle([heir])
            logger.info("run %s took over from %s run %s for %d followers", heir.pk, leader.status, leader.pk, moved)
            return moved + 1
        if heir.follows_id is not None:
            # Another identical run leads now: everyone follows it.
            moved = Run.objects.filter(follows=leader, status=RunStatus.QUEUED).update(follows_id=heir.follows_id)
            followers_settle(Run.objects.filter(pk=heir.follows_id))
            return moved + 1
        # The heir was cancelled or expired meanwhile: the next one inherits.


def sweep_followers(limit: int) -> int:
    """Followers still queued behind a leader that already ended (a crash between steps): settle them."""
    ended = RunStatus.terminal()
    leader_ids = (
        Run.objects.filter(status=RunStatus.QUEUED, follows__status__in=ended)
        .values_list("follows_id", flat=True)
        .distinct()[:limit]
    )
    return followers_settle(Run.objects.filter(pk__in=list(leader_ids)))
