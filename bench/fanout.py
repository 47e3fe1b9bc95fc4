"""What a fan-out and fan-in costs: one parent gathering N children, against the same N runs submitted flat.

    .venv/bin/python bench/fanout.py [--sizes 10,100,1000,10000] [--repeats 5] [--quick]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process and the
standard worker (two processes) exactly as the Procfile runs them, with the benchmark's agents
(bench/agents.py). For each N, in one invocation, `--repeats` times, one after the other:

- fan-out: one `bench.fan` run, whose agent delegates N runs of `bench.nothing` (a no-op that is
  never cached) and whose continuation gathers their outcomes.
- flat: the same N `bench.nothing` runs submitted through POST /api/v1/runs/batch/ (1,000 a request).

Each is timed two ways:

- at the client, from just before the first POST to the moment the result is there to read: for the
  fan-out, `?wait` on the parent returning it finished; for the flat runs, the last of their
  `succeeded` events arriving on the agent's event channel (what `GET /api/v1/events/?agent=`
  streams), which is published once the run's outcome is stored. Both sides pay the same things:
  the requests, the submission, the runs, recording the last outcome and hearing of it. This is the
  figure the target applies to.
- by the rows' own stamps: the parent's finished_at - submitted_at, against the flat runs' latest
  finished_at - earliest submitted_at. The flat span ends when the last agent returned, before its
  outcome is recorded; the parent's ends once its continuation ran, after the last children's
  outcomes were recorded and it was queued and claimed again.

Prints the median of each over the repeats, the ratios (target: fan-out <= 1.2 x flat at N = 1,000,
at the client) and the fan-out's cost per child, which must stay flat as N grows (no step may look
at all siblings each time one ends).
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Api, configure, start_platform, throwaway

configure(AGENT_MODULES="bench.agents", TIER_BACKLOG_LIMIT_STANDARD="1000000", RUN_TREE_MAX_RUNS="10")

TARGET_RATIO = 1.2
BATCH = 1000
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


def fan_out(api: Api, n: int) -> tuple[float, float]:
    """(seconds at the client, seconds by the parent's stamps) from the parent's submission to its result."""
    from agents.models import Run

    began = time.monotonic()
    run = api.post("/api/v1/runs/", {"agent": "bench.fan", "input": {"n": n}})
    while run["status"] not in TERMINAL:
        run = api.get(f"/api/v1/runs/{run['id']}/?wait=30")
    client_s = time.monotonic() - began
    if run["status"] != "succeeded" or run["result"]["succeeded"] != n:
        raise RuntimeError(f"the fan-out of {n} ended {run['status']}: {run['result'] or run['error']}")
    row = Run.objects.get(pk=run["id"])
    return client_s, (row.finished_at - row.submitted_at).total_seconds()


class EndedEvents:
    """Hears the final events of an agent's runs from now on, noting when each run's arrived."""

    def __init__(self, agent: str) -> None:
        from agentplatform import events
        from agentplatform.redis_client import redis_client

        self.arrived: dict[str, float] = {}
        self.changed = threading.Condition()
        self.stopped = threading.Event()
        self.pubsub = redis_client().pubsub()
        self.pubsub.subscribe(events.agent_channel(agent))
        confirmed = self.pubsub.get_message(timeout=10)
        if (confirmed or {}).get("type") != "subscribe":
            raise RuntimeError(f"the subscription to {agent}'s events was not confirmed: {confirmed}")
        # The pub-sub connection is read by this thread alone, until it stops.
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        from agentplatform import events

        while not self.stopped.is_set():
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is None:
                continue
            at = time.monotonic()
            runs = [event["run"] for event in events.events_of_message(message["data"]) if event["event"] in TERMINAL]
            if runs:
                with self.changed:
                    self.arrived.update((run, at) for run in runs)
                    self.changed.notify_all()

    def last_of(self, runs: list[str], timeout: float) -> float:
        """When the last of `runs` had its final event heard; RuntimeError if one is not heard within `timeout`."""
        with self.changed:
            if not self.changed.wait_for(lambda: all(run in self.arrived for run in runs), timeout=timeout):
                raise RuntimeError(f"{sum(run not in self.arrived for run in runs)} runs were not heard ending")
            return max(self.arrived[run] for run in runs)

    def close(self) -> None:
        self.stopped.set()
        self.reader.join()
        self.pubsub.close()


def flat(api: Api, n: int, first: int) -> tuple[float, float]:
    """(seconds at the client, seconds by the runs' stamps) from submitting N flat runs to the last one's end."""
    from django.db.models import Max, Min

    from agents.models import Run, RunStatus

    heard = EndedEvents("bench.nothing")
    try:
        ids: list[str] = []
        began = time.monotonic()
        for start in range(0, n, BATCH):
            items = [{"agent": "bench.nothing", "input": {"i": first + i}} for i in range(start, min(n, start + BATCH))]
            ids += [run["id"] for run in api.post("/api/v1/runs/batch/", {"runs": items})]
        client_s = heard.last_of(ids, timeout=120) - began
    finally:
        heard.close()
    runs = Run.objects.filter(pk__in=ids)
    if runs.exclude(status=RunStatus.SUCCEEDED).exists():
        raise RuntimeError(f"some of the {n} flat runs did not succeed")
    span = runs.aggregate(first=Min("submitted_at"), last=Max("finished_at"))
    return client_s, (span["last"] - span["first"]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000", help="comma-separated N")
    parser.add_argument("--repeats", type=int, default=5, help="fan-out and flat pairs per N (the median is shown)")
    parser.add_argument("--quick", action="store_true", help="N = 10 and 100 only, once each")
    args = parser.parse_args()
    sizes = [10, 100] if args.quick else [int(size) for size in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats

    figures, first = [], 0
    with throwaway() as processes:
        api = start_platform(processes, ["standard"])
        fan_out(api, 10)  # warm-up: every process has run a fan-out and its children
        flat(api, 10, first=first)
        for n in sizes:
            pairs = []
            for _ in range(repeats):
                first += n
                pairs.append((fan_out(api, n), flat(api, n, first=first)))
            figures.append((n, pairs))
        processes.stop_all()

    print("fan-out and fan-in of N no-op children vs the same N runs submitted flat (standard pool, 2 processes),")
    print(f"median of {repeats}; at the client (the target's figure) and by the rows' stamps")
    header = ["N", "fan-out s", "flat s", "ratio", "ratios (each)", "stamps: fan-out s", "flat s", "ratio"]
    print(f"{header[0]:>7} {header[1]:>10} {header[2]:>8} {header[3]:>6} {header[4]:<20} {header[5]:>18} "
          f"{header[6]:>8} {header[7]:>6} {'fan-out ms/child':>17}")  # fmt: skip
    at = {}
    for n, pairs in figures:
        tree_s = statistics.median(tree[0] for tree, _ in pairs)
        flat_s = statistics.median(flat_[0] for _, flat_ in pairs)
        tree_stamps = statistics.median(tree[1] for tree, _ in pairs)
        flat_stamps = statistics.median(flat_[1] for _, flat_ in pairs)
        each = ", ".join(f"{tree[0] / flat_[0]:.2f}" for tree, flat_ in pairs)
        at[n] = tree_s / flat_s
        print(f"{n:>7,} {tree_s:>10.3f} {flat_s:>8.3f} {at[n]:>6.2f} {each:<20} {tree_stamps:>18.3f} "
              f"{flat_stamps:>8.3f} {tree_stamps / flat_stamps:>6.2f} {tree_s / n * 1000:>17.3f}")  # fmt: skip
    if 1000 in at:
        verdict = "met" if at[1000] <= TARGET_RATIO else "NOT met"
        print(f"ratio at N = 1,000, at the client: {at[1000]:.2f} (target <= {TARGET_RATIO}: {verdict})")


if __name__ == "__main__":
    main()
