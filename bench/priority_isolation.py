"""Critical latency under a batch backlog: the platform's tiers against one shared Celery queue.

    .venv/bin/python bench/priority_isolation.py [--batch 5000] [--work-ms 20] [--rate 20] [--seconds 10]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process and the
critical and batch workers exactly as the Procfile runs them, and submits everything through the
REST API: critical `spin` runs at a steady rate with no backlog (idle), a batch backlog alone
(drain rate), then the backlog with the same critical traffic (under load). Then it runs the same
load on the naive Celery set-up — one queue, one pool of the same size for every tier — and prints
the figures and the ratios. Latency is submission to finish, from the run's own timestamps.
"""

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Api, Processes, configure, paced, percentiles, start_platform, throwaway, wait_for_workers

configure(TIER_BACKLOG_LIMIT_BATCH="1000000")


# --- the platform ---------------------------------------------------------------------------


def platform_latencies_ms(ids: list[str], seconds: float = 900) -> list[float]:
    """Submission-to-finish latencies of the runs, once every run of their tier has finished."""
    from agents.models import Run, RunStatus

    tiers = set(Run.objects.filter(pk__in=ids[:1]).values_list("tier", flat=True))
    deadline = time.monotonic() + seconds
    # A cheap indexed question while the workers are busy; the run rows are read once at the end.
    while Run.objects.filter(tier__in=tiers, status__in=[RunStatus.QUEUED, RunStatus.RUNNING]).exists():
        if time.monotonic() > deadline:
            raise RuntimeError("runs did not finish in time")
        time.sleep(0.5)
    runs = list(Run.objects.filter(pk__in=ids).values_list("status", "submitted_at", "finished_at", "queue_wait_ms"))
    failed = [status for status, *_ in runs if status != RunStatus.SUCCEEDED]
    if failed:
        raise RuntimeError(f"{len(failed)} runs did not succeed: {set(failed)}")
    LAST_QUEUE_WAITS[:] = [wait for *_, wait in runs]
    return [(finished - submitted).total_seconds() * 1000 for _, submitted, finished, _ in runs]


LAST_QUEUE_WAITS: list[float] = []


def platform_drain_rate(ids: list[str], submitted_from: float) -> float:
    """Batch runs finished per second, from the first submission to the last finish."""
    from django.db.models import Max

    from agents.models import Run

    platform_latencies_ms(ids)
    last = Run.objects.filter(pk__in=ids).aggregate(last=Max("finished_at"))["last"].timestamp()
    return len(ids) / (last - submitted_from)


def platform_submit_batch(api: Api, count: int, work_ms: float) -> tuple[list[str], float]:
    started, ids = time.time(), []
    for offset in range(0, count, 1000):
        runs = [{"agent": "spin", "input": {"ms": work_ms}, "tier": "batch"}] * min(1000, count - offset)
        ids += [run["id"] for run in api.post("/api/v1/runs/batch/", {"runs": runs})]
    return ids, started


def platform_critical(api: Api, args) -> list[str]:
    def submit() -> str:
        return api.post("/api/v1/runs/", {"agent": "spin", "input": {"ms": args.work_ms}, "tier": "critical"})["id"]

    return paced(args.rate, int(args.rate * args.seconds), submit)


def bench_platform(args, processes: Processes) -> dict:
    api = start_platform(processes, ["critical", "batch"])
    platform_critical(api, argparse.Namespace(**{**vars(args), "seconds": 1}))  # warm up every process

    idle = percentiles(platform_latencies_ms(platform_critical(api, args)))
    idle["queue_wait"] = percentiles(LAST_QUEUE_WAITS)
    batch_ids, started = platform_submit_batch(api, args.batch, args.work_ms)
    drain_alone = platform_drain_rate(batch_ids, started)
    batch_ids, started = platform_submit_batch(api, args.batch, args.work_ms)
    loaded = percentiles(platform_latencies_ms(platform_critical(api, args)))
    loaded["queue_wait"] = percentiles(LAST_QUEUE_WAITS)
    drain_loaded = platform_drain_rate(batch_ids, started)
    processes.stop_all()
    return {"idle": idle, "loaded": loaded, "drain_alone": drain_alone, "drain_loaded": drain_loaded}


# --- the naive set-up: raw Celery, one queue, one pool ---------------------------------------


def bench_naive(args, processes: Processes) -> dict:
    from agentplatform.redis_client import redis_client
    from bench.naive_celery import DONE_KEY, QUEUE, app, spin

    concurrency = os.environ.get("WORKER_CONCURRENCY_BATCH", "2")
    processes.start(
        [sys.executable, "-m", "celery", "-A", "bench.naive_celery", "worker", "-Q", QUEUE, "-n", "naive@%h",
         "--concurrency", concurrency, "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        log="naive",
    )  # fmt: skip
    wait_for_workers(["naive"])
    redis = redis_client()
    submitted: dict[str, float] = {}

    def send(kind: str) -> str:
        key = f"{kind}-{uuid.uuid4().hex}"
        submitted[key] = time.time()
        spin.apply_async(args=[args.work_ms, key], queue=QUEUE)
        return key

    with app.producer_or_acquire():
        for _ in range(args.batch):
            send("batch")
    critical = paced(args.rate, int(args.rate * args.seconds), lambda: send("critical"))
    deadline = time.monotonic() + 900
    while redis.hlen(DONE_KEY) < len(submitted) and time.monotonic() < deadline:
        time.sleep(0.5)
    done = {key.decode(): float(at) for key, at in redis.hgetall(DONE_KEY).items()}
    processes.stop_all()
    return {"loaded": percentiles([(done[key] - submitted[key]) * 1000 for key in critical])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=5000, help="batch runs in the backlog")
    parser.add_argument("--work-ms", type=float, default=20, help="CPU milliseconds per run")
    parser.add_argument("--rate", type=float, default=20, help="critical runs per second")
    parser.add_argument("--seconds", type=float, default=10, help="seconds of critical traffic")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    with throwaway() as processes:
        platform = bench_platform(args, processes)
        naive = None if args.skip_naive else bench_naive(args, processes)

    def row(name: str, figures: dict) -> str:
        p50, p95, p99 = figures["p50"], figures["p95"], figures["p99"]
        return f"  {name:<34} p50 {p50:8.1f}  p95 {p95:8.1f}  p99 {p99:8.1f}  n={figures['n']}"

    print(f"\ncritical submit->done latency, ms ({args.rate:g}/s for {args.seconds:g} s, {args.work_ms:g} ms CPU each)")
    print(row("platform, no backlog", platform["idle"]))
    print(row("  of which queue wait", platform["idle"]["queue_wait"]))
    print(row(f"platform, {args.batch} batch queued", platform["loaded"]))
    print(row("  of which queue wait", platform["loaded"]["queue_wait"]))
    if naive:
        print(row(f"naive one queue, {args.batch} batch queued", naive["loaded"]))
    print("\nbatch drain, runs/s")
    print(f"  {'platform, no critical traffic':<34} {platform['drain_alone']:8.1f}")
    print(f"  {'platform, with critical traffic':<34} {platform['drain_loaded']:8.1f}")
    print("\nratios")
    loaded_vs_idle = platform["loaded"]["p99"] / platform["idle"]["p99"]
    print(f"  critical p99 under load / idle            {loaded_vs_idle:6.2f}x  (target <= 2)")
    if naive:
        naive_vs_platform = naive["loaded"]["p99"] / platform["loaded"]["p99"]
        print(f"  naive p99 / platform p99 under load       {naive_vs_platform:6.1f}x  (target >= 20)")
    kept = platform["drain_loaded"] / platform["drain_alone"]
    print(f"  batch drain kept with critical traffic    {kept:6.1%}  (target >= 90%)")


if __name__ == "__main__":
    main()
