"""Drain of no-op runs: the platform against raw Celery, on the same Redis with the same two worker processes.

    .venv/bin/python bench/throughput.py [--runs 10000] [--batch-size 1000] [--platform-first]
                                         [--skip-raw] [--skip-platform]

Raw Celery (bench/raw_celery_app.py): `celery worker -c 2 --pool prefork` with Celery's defaults
(prefetch 4, early acknowledgement) and results in Redis, under its own key prefix. The client
sends `--runs` no-op tasks with apply_async from one thread, then waits for every result through
the result backend (ResultSet.join_native, one subscription per task, no polling). Figures: the
send rate, the client's wall time from the first send to the last result in hand, and the drain
from the first send to the latest `date_done` the worker stored.

The platform: the web process and the standard worker (concurrency 2) exactly as the Procfile runs
them, on a throw-away PostgreSQL database and Redis prefix. The client submits `--runs` `echo`
runs through POST /api/v1/runs/batch/, `--batch-size` a request from one thread, then polls the
database until every run is terminal. Figures: the acceptance rate of the batch endpoint while
submitting, the client's wall time from the first request to the poll that saw the last run
terminal, and the drain from the runs' own timestamps, N / (max finished_at - min submitted_at).

Both sides are warmed up (every process has handled a few tasks) before anything is timed.
"""

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Api, Processes, configure, start_platform, throwaway

configure(TIER_BACKLOG_LIMIT_STANDARD="1000000")

WARM_UP_RUNS = 20
POLL_SECONDS = 0.2


# --- raw Celery -------------------------------------------------------------------------------


def latest_date_done(task_ids: list[str]) -> float:
    """The latest finish the worker stored with the results, as a Unix time."""
    import json

    import redis

    from bench.raw_celery_app import REDIS_URL, app

    client = redis.Redis.from_url(REDIS_URL)
    latest = 0.0
    try:
        for offset in range(0, len(task_ids), 1000):
            chunk = task_ids[offset : offset + 1000]
            for raw in client.mget([app.backend.get_key_for_task(task_id) for task_id in chunk]):
                done = datetime.fromisoformat(json.loads(raw)["date_done"])
                # Celery stores UTC; a naive stamp is UTC too.
                latest = max(latest, (done if done.tzinfo else done.replace(tzinfo=UTC)).timestamp())
    finally:
        client.close()
    return latest


def bench_raw(runs: int, processes: Processes) -> dict:
    from celery.result import ResultSet

    from bench.raw_celery_app import app, noop, raw_worker

    with raw_worker(processes):
        ResultSet([noop.apply_async() for _ in range(WARM_UP_RUNS)]).join_native(timeout=60)

        with app.producer_or_acquire() as producer:
            first_send = time.time()
            results = [noop.apply_async(producer=producer) for _ in range(runs)]
            sent = time.time()
        ResultSet(results).join_native(timeout=120 + runs / 10)
        joined = time.time()
        last_done = latest_date_done([result.id for result in results])
    return {
        "runs": runs,
        "accept_rate": runs / (sent - first_send),
        "wall_s": joined - first_send,
        "drain": runs / (last_done - first_send),
        "succeeded": runs,
        "failed": 0,
    }


# --- the platform -----------------------------------------------------------------------------


def wait_until_terminal(since: datetime, count: int, seconds: float) -> float:
    """Poll until `count` echo runs submitted since `since` are terminal; returns when that was seen."""
    from agents.models import Run, RunStatus

    terminal = Run.objects.filter(agent__name="echo", submitted_at__gte=since, status__in=RunStatus.terminal())
    deadline = time.monotonic() + seconds
    while terminal.count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {terminal.count()} of {count} runs finished within {seconds:.0f} s")
        time.sleep(POLL_SECONDS)
    return time.time()


def warm_up_platform(api: Api) -> None:
    """A few runs, each on a new connection, so that both web processes have found the agents and
    both worker processes have run one."""
    since = datetime.now(UTC)
    for i in range(WARM_UP_RUNS):
        api.another().post("/api/v1/runs/", {"agent": "echo", "input": {"warm_up": i}, "tier": "standard"})
    wait_until_terminal(since, WARM_UP_RUNS, seconds=60)


def bench_platform(runs: int, batch_size: int, processes: Processes) -> dict:
    api = start_platform(processes, ["standard"])
    # Django is set up by start_platform(), so its models are imported only now.
    from django.db.models import Count, Max, Min

    from agents.models import Run, RunStatus

    try:
        warm_up_platform(api)
        since = datetime.now(UTC)
        first_request = time.time()
        for offset in range(0, runs, batch_size):
            body = [
                {"agent": "echo", "input": {"i": k}, "tier": "standard"}
                for k in range(offset, min(offset + batch_size, runs))
            ]
            api.post("/api/v1/runs/batch/", {"runs": body})
        submitted = time.time()
        seen_done = wait_until_terminal(since, runs, seconds=120 + runs / 10)
        measured = Run.objects.filter(agent__name="echo", submitted_at__gte=since)
        span = measured.aggregate(first=Min("submitted_at"), last=Max("finished_at"))
        statuses = dict(measured.values_list("status").annotate(n=Count("pk")).order_by())
    finally:
        processes.stop_all()
    return {
        "runs": runs,
        "accept_rate": runs / (submitted - first_request),
        "wall_s": seen_done - first_request,
        "drain": runs / (span["last"] - span["first"]).total_seconds(),
        "succeeded": statuses.get(RunStatus.SUCCEEDED, 0),
        "failed": runs - statuses.get(RunStatus.SUCCEEDED, 0),
        "statuses": statuses,
    }


def dramatiq_available() -> bool:
    try:
        import dramatiq  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000, help="no-op runs drained on each side")
    parser.add_argument("--batch-size", type=int, default=1000, help="runs per platform batch request")
    parser.add_argument("--platform-first", action="store_true", help="measure the platform before raw Celery")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--skip-platform", action="store_true")
    args = parser.parse_args()

    figures: dict[str, dict] = {}
    order = ["platform", "raw"] if args.platform_first else ["raw", "platform"]
    with throwaway() as processes:
        for side in order:
            if side == "raw" and not args.skip_raw:
                figures["raw"] = bench_raw(args.runs, processes)
            elif side == "platform" and not args.skip_platform:
                figures["platform"] = bench_platform(args.runs, args.batch_size, processes)

    print(f"\n{args.runs:,} no-op runs, 2 worker processes (prefork), one client thread, same Redis; order: {order}")
    columns = ("drain runs/s", "wall s", "wall runs/s", "send runs/s", "ok", "failed")
    print(f"  {'':<38} " + " ".join(f"{name:>12}" for name in columns))
    names = {"raw": "raw Celery (-c 2, results in Redis)", "platform": f"platform (standard, batch {args.batch_size})"}
    for side in ("raw", "platform"):
        if side in figures:
            f = figures[side]
            print(
                f"  {names[side]:<38} {f['drain']:12.1f} {f['wall_s']:12.2f} {f['runs'] / f['wall_s']:12.1f} "
                f"{f['accept_rate']:12.1f} {f['succeeded']:12,} {f['failed']:12,}"
            )
    if figures.get("platform", {}).get("failed"):
        print(f"  platform runs by status: {figures['platform']['statuses']}")
    print("  drain: raw from the first send to the latest date_done; platform min(submitted_at) to max(finished_at)")
    print("  send: raw apply_async rate; platform batch endpoint acceptance rate")
    if "raw" in figures and "platform" in figures:
        raw, platform = figures["raw"], figures["platform"]
        print(f"\n  platform / raw, drain         {platform['drain'] / raw['drain']:6.3f}x")
        print(f"  platform / raw, client wall   {raw['wall_s'] / platform['wall_s']:6.3f}x  (runs/s ratio)")
    if not dramatiq_available():
        print("\n  Dramatiq: skipped (not installed)")
    else:
        print("\n  Dramatiq: skipped (installed, but this benchmark does not measure it)")


if __name__ == "__main__":
    main()
