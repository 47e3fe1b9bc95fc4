"""The platform's own cost per run: idle overhead, a cached answer, batch acceptance, submission under a backlog.

    .venv/bin/python bench/overhead.py [--quick] [--sequential 1000] [--cached 500] [--batch-requests 10]
                                       [--singles 300] [--backlog 50000]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process and the
critical worker exactly as the Procfile runs them (no standard or batch worker), with the
benchmark's agents (bench/agents.py), and talks to it through the REST API from one client:

a. Idle overhead: `--sequential` critical `sleep` runs of 10 ms, one at a time, waited for in two
   ways taken in turn: POST, then GET ?wait until terminal (two requests); and POST ?wait (one
   request, which listens for the run's end before the run exists). Overhead per run is
   (finished_at - submitted_at) - agent time, from the run's own row, where the agent's time is
   finished_at - started_at, the stamps taken around the agent's call (run_ms is the same span
   in whole milliseconds rounded down; the figure with run_ms, high by up to 1 ms, is printed too).
   Raw Celery's idle overhead is measured the same way, in turn with the platform's two ways:
   tasks sleeping 10 ms sent one at a time to a raw Celery worker (bench/raw_celery_app.py, two
   prefork processes, Celery's defaults, results in Redis), each stamped by the client just before
   apply_async and by the task around its sleep. On this kind of machine, where every hand-over
   between processes wakes an idle CPU, the figures of both move by up to twice between quiet and
   busy stretches: raw Celery's, taken in turn with the platform's, shows which stretch it was.
b. Cached answer: `bench.noop` (cacheable, critical, does nothing) is run once so that its result
   is cached, then the same input is submitted `--cached` times (each must answer `cached: true`),
   timed at the client; then as many submissions with `"cache": "bypass"`, each waited for.
c. Batch acceptance: `--batch-requests` POST /api/v1/runs/batch/ of `--batch-size` `echo` runs on
   the batch tier, which no worker consumes, each request timed at the client.
d. Submission cost against the backlog: `--singles` single POST /api/v1/runs/ of `echo` on the
   batch tier with no batch run queued (measured before c), then again once c and a fill through
   the batch endpoint have queued `--backlog` batch runs.
"""

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Api, configure, percentiles, start_platform, throwaway

# The backlog of d must be admitted: the batch tier's limit is far above it.
configure(AGENT_MODULES="bench.agents", TIER_BACKLOG_LIMIT_BATCH="1000000")

TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
CACHED_AGENT = "bench.noop"
SLEEP_SECONDS = 0.01
WARM_UP_RUNS = 20

TARGET_IDLE_P50_MS = 3.0
# Raw Celery's idle round trip where the targets were set (the table): the target is this many times it.
RAW_IDLE_P50_WHEN_SET_MS = 1.1
TARGET_IDLE_P99_MS = 10.0
TARGET_CACHED_P50_MS = 2.5
TARGET_CACHED_SHARE = 1 / 3
TARGET_BATCH_RUNS_PER_S = 5000.0
TARGET_BACKLOG_RATIO = 1.5


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def submit_and_wait(api: Api, body: dict, *, one_request: bool = False) -> tuple[dict, float]:
    """Submit one run and wait until it is terminal (GET ?wait after the POST, or POST ?wait with `one_request`);
    returns its row and the client's round trip in ms."""
    started = time.perf_counter()
    run = api.post("/api/v1/runs/?wait=10" if one_request else "/api/v1/runs/", body)
    while run["status"] not in TERMINAL:
        run = api.get(f"/api/v1/runs/{run['id']}/?wait=10")
    return run, (time.perf_counter() - started) * 1000


def timed_post(api: Api, path: str, body: dict) -> tuple[dict | list, float]:
    started = time.perf_counter()
    answer = api.post(path, body)
    return answer, (time.perf_counter() - started) * 1000


def warm_up(api: Api) -> None:
    """Each web process finds the agents on its first request, and requests arriving at a cold one
    together can be refused, so a few go one at a time, each on a new connection (both web processes
    get some); the worker process pool runs some too."""
    for i in range(WARM_UP_RUNS):
        client = api.another()
        submit_and_wait(client, {"agent": "sleep", "input": {"seconds": 0}, "tier": "critical"})
        submit_and_wait(client, {"agent": CACHED_AGENT, "input": {"n": 1_000_000 + i}, "cache": "bypass"})
        # On the critical tier: the batch tier's backlog must be empty when d starts.
        submit_and_wait(client, {"agent": "echo", "input": {"warm_up": i}, "tier": "critical"})


WAYS = {False: "POST, then GET ?wait", True: "POST ?wait"}
RAW = "raw Celery"


def raw_celery_idle() -> tuple[float, float]:
    """One task sleeping SLEEP_SECONDS sent to raw Celery and waited for: (finished - sent) - sleep time, and the
    client's round trip, in ms."""
    from bench.raw_celery_app import sleep

    sent, started = time.time(), time.perf_counter()
    task_started, task_finished = sleep.delay(SLEEP_SECONDS).get(timeout=10)
    return ((task_finished - sent) - (task_finished - task_started)) * 1000, (time.perf_counter() - started) * 1000


def idle_overhead(api: Api, count: int) -> dict[str, dict]:
    """`count` sleeps of raw Celery and `count` runs waited for each of the platform's WAYS, all taken in turn."""
    from bench.raw_celery_app import sleep

    for _ in range(WARM_UP_RUNS):
        sleep.delay(0).get(timeout=10)
    figures = {way: {"overhead": [], "with_run_ms": [], "round_trip": [], "not_succeeded": 0} for way in WAYS}
    figures[RAW] = {"overhead": [], "round_trip": []}
    body = {"agent": "sleep", "input": {"seconds": SLEEP_SECONDS}, "tier": "critical"}
    for i in range(3 * count):
        if i % 3 == 0:
            overhead_ms, client_ms = raw_celery_idle()
            figures[RAW]["overhead"].append(overhead_ms)
            figures[RAW]["round_trip"].append(client_ms)
            continue
        way = figures[one_request := i % 3 == 2]
        run, client_ms = submit_and_wait(api, body, one_request=one_request)
        if run["status"] != "succeeded":
            way["not_succeeded"] += 1
            continue
        submitted, started, finished = at(run["submitted_at"]), at(run["started_at"]), at(run["finished_at"])
        elapsed_ms = (finished - submitted).total_seconds() * 1000
        way["overhead"].append(elapsed_ms - (finished - started).total_seconds() * 1000)
        way["with_run_ms"].append(elapsed_ms - run["run_ms"])
        way["round_trip"].append(client_ms)
    return {
        way: {key: percentiles(value) if isinstance(value, list) else value for key, value in figures.items()}
        for way, figures in figures.items()
    }


def cached_answer(api: Api, count: int) -> dict:
    body = {"agent": CACHED_AGENT, "input": {"n": 1}, "tier": "critical"}
    first, _ = submit_and_wait(api, body)
    if first["status"] != "succeeded":
        raise RuntimeError(f"the run that fills the cache ended {first['status']}: {first['error']}")
    cached_ms, missed = [], 0
    for _ in range(count):
        run, client_ms = timed_post(api, "/api/v1/runs/", body)
        cached_ms.append(client_ms)
        missed += not run["cached"]
    uncached_ms, uncached_failed = [], 0
    for _ in range(count):
        run, client_ms = submit_and_wait(api, {**body, "cache": "bypass"})
        uncached_ms.append(client_ms)
        uncached_failed += run["status"] != "succeeded"
    return {
        "cached": percentiles(cached_ms),
        "missed": missed,
        "uncached": percentiles(uncached_ms),
        "uncached_failed": uncached_failed,
    }


def echo_batch(first: int, size: int) -> dict:
    return {"runs": [{"agent": "echo", "input": {"i": k}, "tier": "batch"} for k in range(first, first + size)]}


def single_submissions(api: Api, count: int, first: int) -> dict:
    timings = []
    for k in range(first, first + count):
        _, client_ms = timed_post(api, "/api/v1/runs/", {"agent": "echo", "input": {"i": k}, "tier": "batch"})
        timings.append(client_ms)
    return percentiles(timings)


def queued_batch_runs() -> int:
    from agents.models import Run, RunStatus

    return Run.objects.filter(tier="batch", status=RunStatus.QUEUED).count()


def batch_acceptance(api: Api, requests: int, size: int, first: int) -> dict:
    timings = [timed_post(api, "/api/v1/runs/batch/", echo_batch(first + i * size, size))[1] for i in range(requests)]
    return {
        "request_ms": percentiles(timings),
        "runs_per_s": requests * size / (sum(timings) / 1000),
        "slowest_runs_per_s": size / (max(timings) / 1000),
    }


def fill_backlog(api: Api, target: int, size: int, first: int) -> dict:
    """Queue batch runs through the batch endpoint until `target` are queued."""
    submitted, started = 0, time.perf_counter()
    while (missing := target - queued_batch_runs()) > 0:
        chunk = min(size, missing)
        api.post("/api/v1/runs/batch/", echo_batch(first + submitted, chunk))
        submitted += chunk
    return {"submitted": submitted, "seconds": time.perf_counter() - started, "queued": queued_batch_runs()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every count cut down, for a check that it runs")
    parser.add_argument("--sequential", type=int, default=1000, help="a: sequential sleep runs")
    parser.add_argument("--cached", type=int, default=500, help="b: cached submissions, and as many uncached runs")
    parser.add_argument("--batch-requests", type=int, default=10, help="c: batch requests timed")
    parser.add_argument("--batch-size", type=int, default=1000, help="c: runs per batch request (and per fill)")
    parser.add_argument("--singles", type=int, default=300, help="d: single submissions timed at each backlog")
    parser.add_argument("--backlog", type=int, default=50_000, help="d: queued batch runs of the full backlog")
    args = parser.parse_args()
    if args.quick:
        args.sequential, args.cached, args.batch_requests, args.singles, args.backlog = 100, 50, 2, 50, 5000

    from bench.raw_celery_app import raw_worker

    with throwaway() as processes:
        api = start_platform(processes, ["critical"])
        warm_up(api)
        with raw_worker(processes):
            idle = idle_overhead(api, args.sequential)
        cache = cached_answer(api, args.cached)
        # The empty-backlog submissions come before anything of c or the fill is queued.
        backlog_before = queued_batch_runs()
        empty = single_submissions(api, args.singles, first=0)
        batch = batch_acceptance(api, args.batch_requests, args.batch_size, first=args.singles)
        filled_from = args.singles + args.batch_requests * args.batch_size
        fill = fill_backlog(api, args.backlog, args.batch_size, first=filled_from)
        full = single_submissions(api, args.singles, first=10_000_000)
        processes.stop_all()
    report(
        args, idle=idle, cache=cache, batch=batch, backlog_before=backlog_before, empty=empty, fill=fill,
        full=full,
    )  # fmt: skip


TAIL = ("p50", "p95", "max")


def spread(figures: dict, keys: tuple[str, ...] = ("p50", "p95", "p99", "max")) -> str:
    return "    " + "  ".join(f"{key} {figures[key]:7.2f}" for key in keys) + f"  n={figures['n']:,}"


def report(
    args: argparse.Namespace, *, idle: dict, cache: dict, batch: dict, backlog_before: int,
    empty: dict, fill: dict, full: dict,
) -> None:  # fmt: skip
    runs = f"{args.sequential:,} sequential critical `sleep` runs of {SLEEP_SECONDS * 1000:g} ms each way"
    print(f"\na. idle overhead: {runs}, and as many raw Celery tasks sleeping as long, all three in turn")
    raw = idle[RAW]
    print("  raw Celery: (finished - sent) - sleep, ms")
    print(spread(raw["overhead"]))
    print("  client round trip (apply_async + get), ms")
    print(spread(raw["round_trip"], ("p50", "p99", "max")))
    targets = f"target p50 <= {TARGET_IDLE_P50_MS:g}, p99 <= {TARGET_IDLE_P99_MS:g}"
    raw_p50 = raw["overhead"]["p50"]
    for one_request, way in WAYS.items():
        figures = idle[one_request]
        overhead = figures["overhead"]
        ok = overhead["p50"] <= TARGET_IDLE_P50_MS and overhead["p99"] <= TARGET_IDLE_P99_MS
        print(f"  the platform, waited for by {way}:")
        print(f"  (finished_at - submitted_at) - (finished_at - started_at), ms ({targets}): {met(ok)}")
        print(spread(overhead))
        print("  the same with run_ms as the agent's time, ms")
        print(spread(figures["with_run_ms"]))
        print(f"  client round trip, {way}, ms")
        print(spread(figures["round_trip"], ("p50", "p99", "max")))
        if figures["not_succeeded"]:
            print(f"  runs not succeeded (left out): {figures['not_succeeded']}")
        ratio, set_ratio = overhead["p50"] / raw_p50, TARGET_IDLE_P50_MS / RAW_IDLE_P50_WHEN_SET_MS
        print(
            f"  p50 platform / p50 raw Celery: {ratio:.2f}x (the target was set where raw Celery's was "
            f"{RAW_IDLE_P50_WHEN_SET_MS:g} ms: {set_ratio:.2f}x); platform - raw Celery: "
            f"{overhead['p50'] - raw_p50:.2f} ms"
        )

    cached_p50, uncached_p50 = cache["cached"]["p50"], cache["uncached"]["p50"]
    share = cached_p50 / uncached_p50
    ok = cached_p50 <= TARGET_CACHED_P50_MS and share <= TARGET_CACHED_SHARE
    print(f"\nb. cached answer: `{CACHED_AGENT}`, {args.cached:,} submissions each way, timed at the client")
    print(f"  cached POST, ms (target p50 <= {TARGET_CACHED_P50_MS:g}): {met(cached_p50 <= TARGET_CACHED_P50_MS)}")
    print(spread(cache["cached"], TAIL))
    print(f"    answered without cached: true: {cache['missed']}")
    print("  uncached critical run (cache: bypass), POST + GET ?wait, ms")
    print(spread(cache["uncached"], TAIL))
    if cache["uncached_failed"]:
        print(f"    not succeeded: {cache['uncached_failed']}")
    print(f"  cached p50 / uncached p50 (target <= 1/3, and p50 <= {TARGET_CACHED_P50_MS:g}): {share:.3f}  {met(ok)}")

    rate = batch["runs_per_s"]
    print(f"\nc. batch acceptance: {args.batch_requests} requests of {args.batch_size:,} `echo` runs, batch tier")
    print("  request time, ms")
    print(spread(batch["request_ms"], TAIL))
    ok = rate >= TARGET_BATCH_RUNS_PER_S
    print(f"  accepted, runs/s (target >= {TARGET_BATCH_RUNS_PER_S:,.0f}): {rate:,.0f}  {met(ok)}")
    print(f"    slowest request: {batch['slowest_runs_per_s']:,.0f} runs/s")

    ratio = full["p50"] / empty["p50"]
    print(f"\nd. submission cost vs backlog: {args.singles} single POST /api/v1/runs/ of `echo` on the batch tier")
    print(f"  {backlog_before:,} batch runs queued, ms")
    print(spread(empty, TAIL))
    print(f"  {fill['queued']:,} batch runs queued, ms")
    print(spread(full, TAIL))
    print(f"    (the fill: {fill['submitted']:,} runs in {fill['seconds']:.1f} s through the batch endpoint)")
    ok = ratio <= TARGET_BACKLOG_RATIO
    print(f"  p50 full / p50 empty (target <= {TARGET_BACKLOG_RATIO:g}x): {ratio:.2f}x  {met(ok)}")


if __name__ == "__main__":
    main()
