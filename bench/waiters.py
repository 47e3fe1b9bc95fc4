"""Submission latency with clients waiting on runs: idle, then with `--waiters` concurrent `?wait=` requests.

    .venv/bin/python bench/waiters.py [--quick] [--waiters 200] [--singles 300]

Starts, on loopback and a throw-away PostgreSQL database and Redis prefix, the web process exactly as
the Procfile runs it and no worker, so that runs stay queued. Times `--singles` single submissions
(POST /api/v1/runs/, `echo` on the batch tier) one after another from one client; then starts
`--waiters` threads that each wait on a queued run of their own (GET ?wait=30, again as soon as it
answers) and, once all of them are waiting, times as many submissions again. Every waiter's answer
is counted: a failed wait (5xx, or an error) is reported. Prints both latency spreads, the ratio of
their medians and p99s (target: within 2 times), and the database connections the web processes held
while the waiters waited.
"""

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import DB_NAME, Api, configure, percentiles, start_platform, throwaway

configure(TIER_BACKLOG_LIMIT_BATCH="1000000")

WAIT_SECONDS = 30
TARGET_RATIO = 2.0


def single_submissions(api: Api, count: int, first: int) -> dict:
    timings = []
    for k in range(first, first + count):
        started = time.perf_counter()
        api.post("/api/v1/runs/", {"agent": "echo", "input": {"i": k}, "tier": "batch"})
        timings.append((time.perf_counter() - started) * 1000)
    return percentiles(timings)


class Waiters:
    """Threads that each wait on one queued run, over and over, until stopped."""

    def __init__(self, api: Api, run_ids: list[str]) -> None:
        self.stop = threading.Event()
        self.waiting = threading.Semaphore(0)
        self.answers = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.wait_on, args=(api.another(), run_id)) for run_id in run_ids]

    def wait_on(self, api: Api, run_id: str) -> None:
        first = True
        while not self.stop.is_set():
            if first:
                self.waiting.release()
                first = False
            try:
                api.get(f"/api/v1/runs/{run_id}/?wait={WAIT_SECONDS}")
                with self.lock:
                    self.answers += 1
            except Exception as exc:  # every failure is a figure of this benchmark
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}"[:200])

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            self.waiting.acquire()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def web_connections() -> int:
    """Connections to the benchmark's database other than this process's own."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [DB_NAME]
        )
        (count,) = cursor.fetchone()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every count cut down, for a check that it runs")
    parser.add_argument("--waiters", type=int, default=200, help="concurrent ?wait= requests")
    parser.add_argument("--singles", type=int, default=300, help="single submissions timed in each phase")
    args = parser.parse_args()
    if args.quick:
        args.waiters, args.singles = 20, 50

    with throwaway() as processes:
        api = start_platform(processes, [])
        single_submissions(api, 20, first=-20)  # warm-up
        idle = single_submissions(api, args.singles, first=0)
        run_ids = [api.post("/api/v1/runs/", {"agent": "echo", "input": {"w": k}, "tier": "batch"})["id"]
                   for k in range(args.waiters)]  # fmt: skip
        waiters = Waiters(api, run_ids)
        waiters.start()
        time.sleep(2)  # every waiter is past its first read, waiting on its run's events
        connections = web_connections()
        loaded = single_submissions(api, args.singles, first=args.singles)
        waiters.join()
        processes.stop_all()

    print(f"submission latency at the client, ms ({args.singles} single POST /api/v1/runs/ each)")
    for name, figures in (("idle", idle), (f"{args.waiters} waiting", loaded)):
        spread = "  ".join(f"{key} {figures[key]:7.2f}" for key in ("p50", "p95", "p99", "max"))
        print(f"  {name:>12}: {spread}")
    for key in ("p50", "p99"):
        ratio = loaded[key] / idle[key]
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(f"  {key} ratio, waiting / idle: {ratio:.2f} (target <= {TARGET_RATIO:g}: {verdict})")
    print(f"waits answered: {waiters.answers}, failed: {len(waiters.failures)}")
    for failure in waiters.failures[:5]:
        print(f"  {failure}")
    print(f"database connections of the web processes while {args.waiters} clients waited: {connections}")


if __name__ == "__main__":
    main()
