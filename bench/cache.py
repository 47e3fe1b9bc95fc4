"""Result cache under a skewed load: Zipf-distributed inputs to a CPU-costly cacheable agent.

    .venv/bin/python bench/cache.py [--submissions 10000] [--distinct 1000] [--work-ms 20] [--zipf 1.1]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process, the
standard worker (where the agent runs), and beat with the critical worker (the sweeper, which
settles any follower left behind) exactly as the Procfile runs them, with the benchmark's agent
`bench.costly` (bench/agents.py: standard tier, cacheable for an hour, burns `--work-ms` of CPU
per call and counts its own executions per input in Redis). It draws the inputs once:
`--submissions` draws, seeded, from a Zipf distribution (weight 1/k^s for the k-th most frequent)
over `--distinct` values. Then it submits them twice through the REST API (POST
/api/v1/runs/batch/, `--chunk` runs a request in the drawn order, from `--clients` threads):

- cache on: plain submissions. Hit rate is the share answered at once with `cached: true`;
  coalesced, when the platform records it (`Run.follows`), the runs that followed an identical
  run in flight, and of those the ones settled more than a second after the run they followed
  (left behind by the submission path and found by the sweeper); executions per distinct input
  is what the agent counted over the distinct inputs drawn: 1.00 when each is computed once.
- cache off: the same submissions with `"cache": "bypass"`, after the cached results and the
  execution counts are cleared; every submission executes.

Wall time is from the first submission to the last run's finish, read from the runs themselves.
"""

import argparse
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Api, configure, start_platform, throwaway

configure(AGENT_MODULES="bench.agents", TIER_BACKLOG_LIMIT_STANDARD="1000000")

AGENT = "bench.costly"
TARGET_EXECUTIONS_PER_INPUT = 1.00
LATE_FOLLOWER_SECONDS = 1.0


def zipf_draws(count: int, distinct: int, exponent: float, seed: int) -> list[int]:
    """`count` input numbers from 0..distinct-1, number k drawn with weight 1/(k+1)^exponent."""
    weights = [1 / (rank**exponent) for rank in range(1, distinct + 1)]
    return random.Random(seed).choices(range(distinct), weights=weights, k=count)


def submit_all(api: Api, inputs: list[int], args, *, bypass: bool) -> tuple[list[dict], float, float]:
    """Submit one run per input in order, `args.chunk` per request from `args.clients` threads.

    Returns the runs as answered, the wall-clock time of the first submission and how long it took."""
    local = threading.local()

    def post(chunk: list[int]) -> list[dict]:
        if not hasattr(local, "api"):
            local.api = api.another()
        runs = [{"agent": AGENT, "input": {"n": n, "ms": args.work_ms}} for n in chunk]
        if bypass:
            runs = [{**run, "cache": "bypass"} for run in runs]
        return local.api.post("/api/v1/runs/batch/", {"runs": runs})

    chunks = [inputs[offset : offset + args.chunk] for offset in range(0, len(inputs), args.chunk)]
    started_at, started = time.time(), time.monotonic()
    # The pool hands the chunks out first come first served, so the drawn order is kept.
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        answered = [run for runs in pool.map(post, chunks) for run in runs]
    return answered, started_at, time.monotonic() - started


def wait_until_finished(seconds: float) -> None:
    from agents.models import Run, RunStatus

    deadline = time.monotonic() + seconds
    # One cheap indexed question while the worker is busy; the rows are read once at the end.
    while Run.objects.filter(agent__name=AGENT, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).exists():
        if time.monotonic() > deadline:
            unfinished = Run.objects.filter(agent__name=AGENT, status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
            if follows_recorded():
                # Which runs are stuck: on their own, or behind a leader in which state.
                stuck = Counter(unfinished.values_list("status", "follows__status"))
            else:
                stuck = Counter((status, None) for status in unfinished.values_list("status", flat=True))
            described = ", ".join(
                f"{n} {status}" + (f" following a {leader} run" if leader else "")
                for (status, leader), n in stuck.items()
            )
            raise RuntimeError(f"runs of {AGENT} did not finish within {seconds:.0f} s: {described}")
        time.sleep(0.5)


def follows_recorded() -> bool:
    from agents.models import Run

    return any(field.name == "follows" for field in Run._meta.get_fields())


def phase(api: Api, inputs: list[int], args, *, bypass: bool) -> dict:
    from django.db.models import Count, F, Max

    from agentplatform.redis_client import redis_client
    from agents.models import Run
    from bench.agents import executions_key

    answered, started_at, submit_s = submit_all(api, inputs, args, bypass=bypass)
    wait_until_finished(seconds=120 + len(inputs) * (args.work_ms / 1000 + 0.05))
    ids = [run["id"] for run in answered]
    coalescing = follows_recorded()
    statuses: Counter[str] = Counter()
    last_finish, coalesced, settled_late = 0.0, 0, 0
    for offset in range(0, len(ids), 1000):
        runs = Run.objects.filter(pk__in=ids[offset : offset + 1000])
        statuses.update(dict(runs.values_list("status").annotate(n=Count("pk")).order_by()))
        figures = runs.aggregate(last=Max("finished_at"))
        last_finish = max(last_finish, figures["last"].timestamp())
        if coalescing:
            followers = runs.filter(follows__isnull=False)
            coalesced += followers.count()
            late = F("follows__finished_at") + timedelta(seconds=LATE_FOLLOWER_SECONDS)
            settled_late += followers.filter(finished_at__gt=late).count()
    executions = {int(n): int(count) for n, count in redis_client().hgetall(executions_key()).items()}
    distinct = len(set(inputs))
    return {
        "submissions": len(answered),
        "distinct": distinct,
        "cached": sum(1 for run in answered if run["cached"]),
        "coalesced": coalesced if coalescing else None,
        "settled_late": settled_late,
        "statuses": statuses,
        "executions": sum(executions.values()),
        "per_input": sum(executions.values()) / distinct,
        "most_per_input": max(executions.values(), default=0),
        "executed_twice_or_more": sum(1 for count in executions.values() if count > 1),
        "submit_s": submit_s,
        "wall_s": last_finish - started_at,
    }


def forget() -> None:
    """Clear the agent's cached results and its execution counts."""
    from agentplatform.redis_client import redis_client
    from bench.agents import executions_key
    from caching.results import result_cache_clear

    result_cache_clear(AGENT)
    redis_client().delete(executions_key())


def warm_up(api: Api, args) -> None:
    """Run every process once on inputs outside the draws, one request at a time.

    One at a time, each on a new connection so that both web processes get some: a web process
    finds the declared agents on its first request, and requests that arrive at a cold process
    together can be refused with "Unknown agent" (the registry marks itself discovered before it
    has imported the agent modules)."""
    for n in range(args.distinct, args.distinct + 20):
        run = {"agent": AGENT, "input": {"n": n, "ms": args.work_ms}, "cache": "bypass"}
        api.another().post("/api/v1/runs/batch/", {"runs": [run]})
    wait_until_finished(seconds=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=10_000, help="runs submitted in each phase")
    parser.add_argument("--distinct", type=int, default=1000, help="distinct inputs the draws are made from")
    parser.add_argument("--work-ms", type=float, default=20, help="CPU milliseconds one execution costs")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s (weight 1/k^s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the draws")
    parser.add_argument("--chunk", type=int, default=100, help="runs per batch request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    args = parser.parse_args()
    inputs = zipf_draws(args.submissions, args.distinct, args.zipf, args.seed)

    with throwaway() as processes:
        api = start_platform(processes, ["standard", "critical"], also=("beat",))
        warm_up(api, args)
        forget()
        on = phase(api, inputs, args, bypass=False)
        forget()
        off = phase(api, inputs, args, bypass=True)
        coalescing = follows_recorded()

    print(
        f"\n{args.submissions:,} submissions of {AGENT} ({args.work_ms:g} ms CPU each), inputs Zipf s={args.zipf:g} "
        f"over {args.distinct:,} values (seed {args.seed}); {args.chunk} per request from {args.clients} clients"
    )
    print(f"  {'':<46} {'cache on':>12} {'cache off':>12}")

    def row(name: str, left: str, right: str) -> None:
        print(f"  {name:<46} {left:>12} {right:>12}")

    row("submissions", f"{on['submissions']:,}", f"{off['submissions']:,}")
    row("distinct inputs drawn", f"{on['distinct']:,}", f"{off['distinct']:,}")
    row("answered from the cache", f"{on['cached']:,}", f"{off['cached']:,}")
    row("  hit rate", f"{on['cached'] / on['submissions']:.1%}", f"{off['cached'] / off['submissions']:.1%}")
    if coalescing:
        row("coalesced (followed a run in flight)", f"{on['coalesced']:,}", f"{off['coalesced']:,}")
        late = f"  settled > {LATE_FOLLOWER_SECONDS:g} s after the run followed"
        row(late, f"{on['settled_late']:,}", f"{off['settled_late']:,}")
    else:
        row("coalesced (followed a run in flight)", "not recorded", "not recorded")
    row("executions", f"{on['executions']:,}", f"{off['executions']:,}")
    row("executions per distinct input", f"{on['per_input']:.2f}", f"{off['per_input']:.2f}")
    row("  inputs executed more than once", f"{on['executed_twice_or_more']:,}", f"{off['executed_twice_or_more']:,}")
    row("  most executions of one input", f"{on['most_per_input']:,}", f"{off['most_per_input']:,}")
    for name, figures in (("on", on), ("off", off)):
        others = {status: n for status, n in figures["statuses"].items() if status != "succeeded"}
        if others:
            row(f"  runs not succeeded (cache {name})", str(others), "")
    row("submitting took, s", f"{on['submit_s']:.1f}", f"{off['submit_s']:.1f}")
    row("wall time, first submission to last finish, s", f"{on['wall_s']:.1f}", f"{off['wall_s']:.1f}")
    target = TARGET_EXECUTIONS_PER_INPUT
    met = "met" if on["per_input"] <= target else "NOT met"
    print(f"\n  executions per distinct input, cache on  {on['per_input']:6.2f}   target {target:.2f}: {met}")
    print(f"  wall time cache off / cache on           {off['wall_s'] / on['wall_s']:6.1f}x")


if __name__ == "__main__":
    main()
