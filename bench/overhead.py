"""The platform's own cost per run: idle overhead, a cached answer, batch acceptance, submission under a backlog.

    .venv/bin/python bench/overhead.py [--quick] [--sequential 1000] [--cached 500] [--batch-requests 10]
                                       [--singles 300] [--backlog 50000]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process and the
critical worker exactly as the Procfile runs them (no standard or batch worker), with the
benchmark's agents (bench/agents.py), and talks to it through the REST API from one client:

a. Idle overhead: `--sequential` critical `sleep` runs of 10 ms, one at a time, waited for in two
   ways taken in turn: POST, then GET ?wait until terminal (two requests); and POST ?wait (one
   request, which listens for the run's end before the run exists). Overhead per run is
   (finished_at - submitted_at) - run_ms, from the run's own row; run_ms is whole milliseconds
   rounded down, so the figure is high by less than 1 ms.
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


def idle_overhead(api: Api, count: int) -> dict[bool, dict]:
    """`count` runs waited for each way (by `one_request`), the two ways taken in turn."""
    figures = {way: {"overhead": [], "to_start": [], "round_trip": [], "not_succeeded": 0} for way in WAYS}
    body = {"agent": "sleep", "input": {"seconds": SLEEP_SECONDS}, "tier": "critical"}
    for i in range(2 * count):
        way = figures[one_request := bool(i % 2)]
        run, client_ms = submit_and_wait(api, body, one_request=one_request)
        if run["status"] != "succeeded":
            way["not_succeeded"] += 1
            continue
        submitted, finished = at(run["submitted_at"]), at(run["finished_at"])
        way["overhead"].append((finished - submitted).total_seconds() * 1000 - run["run_ms"])
        way["to_start"].append((at(run["started_at"]) - submitted).total_seconds() * 1000)
        way["round_trip"].append(client_ms)
    return {
        one_request: {
            "overhead": percentiles(way["overhead"]),
            "to_start": percentiles(way["to_start"]),
            "round_trip": percentiles(way["round_trip"]),
            "not_succeeded": way["not_succeeded"],
        }
        for one_request, way in figures.items()
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

    with throwaway() as processes:
        api = start_platform(processes, ["critical"])
        warm_up(api)
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
    report(args, idle=idle, cache=cache, batch=batch, backlog_before=backlog_before, empty=empty, fill=fill, full=full)


TAIL = ("p50", "p95", "max")


def spread(figures: dict, keys: tuple[str, ...] = ("p50", "p95", "p99", "max")) -> str:
    return "    " + "  ".join(f"{key} {figures[key]:7.2f}" for key in keys) + f"  n={figures['n']:,}"


def report(
    args: argparse.Namespace, *, idle: dict, cache: dict, batch: dict, backlog_before: int, empty: dict, fill: dict,
    full: dict,
) -> None:  # fmt: skip
    runs = f"{args.sequential:,} sequential critical `sleep` runs of {SLEEP_SECONDS * 1000:g} ms each way"
    print(f"\na. idle overhead: {runs}, the two ways in turn")
    targets = f"target p50 <= {TARGET_IDLE_P50_MS:g}, p99 <= {TARGET_IDLE_P99_MS:g}"
    for one_request, way in WAYS.items():
        figures = idle[one_request]
        overhead = figures["overhead"]
        ok = overhead["p50"] <= TARGET_IDLE_P50_MS and overhead["p99"] <= TARGET_IDLE_P99_MS
        print(f"  waited for by {way}:")
        print(f"  (finished_at - submitted_at) - run_ms, ms ({targets}): {met(ok)}")
        print(spread(overhead))
        print("  of which submitted_at -> started_at, ms")
        print(spread(figures["to_start"]))
        print(f"  client round trip, {way}, ms")
        print(spread(figures["round_trip"], ("p50", "p99", "max")))
        if figures["not_succeeded"]:
            print(f"  runs not succeeded (left out): {figures['not_succeeded']}")

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
