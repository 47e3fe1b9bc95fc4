"""What a fan-out and fan-in costs: one parent gathering N children, against the same N runs submitted flat.

    .venv/bin/python bench/fanout.py [--sizes 10,100,1000,10000] [--quick]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process and the
standard worker (two processes) exactly as the Procfile runs them, with the benchmark's agents
(bench/agents.py). For each N, in one invocation:

- fan-out: one `bench.fan` run, whose agent delegates N runs of `bench.nothing` (a no-op that is
  never cached) and whose continuation gathers their outcomes. Wall time: the parent's own
  finished_at - submitted_at (the parent's result exists only once every child has ended).
- flat: the same N `bench.nothing` runs submitted through POST /api/v1/runs/batch/ (1,000 a request),
  waited for. Wall time: the latest finished_at - the earliest submitted_at of those runs.

Prints both, their ratio (target: fan-out <= 1.2 x flat at N = 1,000) and the fan-out's cost per
child, which must stay flat as N grows (no step may look at all siblings each time one ends).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Api, configure, start_platform, throwaway

configure(AGENT_MODULES="bench.agents", TIER_BACKLOG_LIMIT_STANDARD="1000000", RUN_TREE_MAX_RUNS="10")

TARGET_RATIO = 1.2
POLL_SECONDS = 0.1
BATCH = 1000


def fan_out(api: Api, n: int) -> float:
    """Seconds from the parent's submission to its result."""
    from agents.models import Run

    run = api.post("/api/v1/runs/", {"agent": "bench.fan", "input": {"n": n}})
    while run["status"] not in ("succeeded", "failed", "cancelled", "expired"):
        run = api.get(f"/api/v1/runs/{run['id']}/?wait=30")
    if run["status"] != "succeeded" or run["result"]["succeeded"] != n:
        raise RuntimeError(f"the fan-out of {n} ended {run['status']}: {run['result'] or run['error']}")
    row = Run.objects.get(pk=run["id"])
    return (row.finished_at - row.submitted_at).total_seconds()


def flat(api: Api, n: int, first: int) -> float:
    """Seconds from the first of N flat runs submitted to the last of them finished."""
    from django.db.models import Max, Min

    from agents.models import Run, RunStatus

    ids: list[str] = []
    for start in range(0, n, BATCH):
        body = {
            "runs": [{"agent": "bench.nothing", "input": {"i": first + i}} for i in range(start, min(n, start + BATCH))]
        }
        ids += [run["id"] for run in api.post("/api/v1/runs/batch/", body)]
    runs = Run.objects.filter(pk__in=ids)
    while runs.exclude(status__in=RunStatus.terminal()).exists():
        time.sleep(POLL_SECONDS)
    if runs.exclude(status=RunStatus.SUCCEEDED).exists():
        raise RuntimeError(f"some of the {n} flat runs did not succeed")
    span = runs.aggregate(first=Min("submitted_at"), last=Max("finished_at"))
    return (span["last"] - span["first"]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000", help="comma-separated N")
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100 only")
    args = parser.parse_args()
    sizes = [10, 100] if args.quick else [int(size) for size in args.sizes.split(",")]

    figures = []
    with throwaway() as processes:
        api = start_platform(processes, ["standard"])
        fan_out(api, 10)  # warm-up: every process has run a fan-out and its children
        flat(api, 10, first=0)
        for n in sizes:
            tree_s = fan_out(api, n)
            flat_s = flat(api, n, first=n)
            figures.append((n, tree_s, flat_s))
        processes.stop_all()

    print("fan-out and fan-in of N no-op children vs the same N runs submitted flat (standard pool, 2 processes)")
    print(f"{'N':>7} {'fan-out s':>10} {'flat s':>9} {'ratio':>6} {'fan-out ms/child':>17} {'flat ms/run':>12}")
    for n, tree_s, flat_s in figures:
        columns = [f"{n:>7,}", f"{tree_s:>10.3f}", f"{flat_s:>9.3f}", f"{tree_s / flat_s:>6.2f}"]
        columns += [f"{tree_s / n * 1000:>17.3f}", f"{flat_s / n * 1000:>12.3f}"]
        print(" ".join(columns))
    at = {n: tree_s / flat_s for n, tree_s, flat_s in figures}
    if 1000 in at:
        verdict = "met" if at[1000] <= TARGET_RATIO else "NOT met"
        print(f"ratio at N = 1,000: {at[1000]:.2f} (target <= {TARGET_RATIO}: {verdict})")


if __name__ == "__main__":
    main()
