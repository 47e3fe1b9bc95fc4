"""Drill: PostgreSQL stopped for 15 s while submissions keep arriving and workers execute; every accepted
run finishes exactly once."""

import itertools
import threading
import time
from collections import Counter

import pytest

from tests.drills.stack import Stack
from tests.drills.tally import settled, tally

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 15
SUBMISSIONS_PER_SECOND = 20
# Longer than a web request may wait for a database connection, so that every request gets its answer.
SUBMISSION_TIMEOUT = 60
SETTLE_SECONDS = 90


class Submitter(threading.Thread):
    """Submits one run at a time, at a steady rate, each request in its own thread; records every answer."""

    def __init__(self, stack: Stack, *, per_second: float) -> None:
        super().__init__(name="drill-submitter", daemon=True)
        self.stack, self.interval = stack, 1 / per_second
        self.stopped = threading.Event()
        self.requests: list[threading.Thread] = []
        self.answers: list[tuple[int | None, str | None]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        began = time.monotonic()
        for n in itertools.count():
            if self.stopped.wait(max(0.0, began + n * self.interval - time.monotonic())):
                return
            request = threading.Thread(target=self.submit, args=(n,), daemon=True)
            request.start()
            self.requests.append(request)

    def submit(self, n: int) -> None:
        body = {"agent": "drill.count", "input": {"tag": f"postgres-outage-{n}", "seconds": 0.02}}
        status, answer = self.stack.call("POST", "/api/v1/runs/", body, timeout=SUBMISSION_TIMEOUT)
        with self.lock:
            self.answers.append((status, answer["id"] if status == 201 else None))

    def finish(self) -> None:
        """Stop submitting and wait for every answer."""
        self.stopped.set()
        self.join()
        for request in self.requests:
            request.join()

    @property
    def accepted(self) -> list[str]:
        return [run_id for status, run_id in self.answers if status == 201]

    def summary(self) -> str:
        counts = Counter("no answer" if status is None else status for status, _ in self.answers)
        return f"{len(self.answers)} submissions answered {dict(counts)}"


# The outage, the answers held back by it and the settling of every run take longer than most tests.
@pytest.mark.timeout(300)
def test_postgres_stopped_under_submission_load_loses_no_accepted_run_and_executes_none_twice(
    make_stack, private_postgres
):
    server, database = private_postgres
    stack = make_stack("postgres-outage", database=database)
    stack.start()
    log = stack.executions
    batch = [{"agent": "drill.count", "input": {"tag": "postgres-outage-batch", "seconds": 0.1}} for _ in range(120)]
    accepted = stack.submit_batch(batch)
    submitter = Submitter(stack, per_second=SUBMISSIONS_PER_SECOND)
    submitter.start()

    log.wait_for(lambda run: run.tier == "standard", what="an execution on the standard worker")
    time.sleep(1)
    in_flight = database.in_flight()
    server.stop()
    time.sleep(OUTAGE_SECONDS)
    server.start()
    time.sleep(5)
    submitter.finish()
    accepted += submitter.accepted
    outcome = tally(accepted=accepted, rows=settled(database, seconds=SETTLE_SECONDS), executions=log.read())

    assert in_flight >= 100, f"only {in_flight} runs were in flight when PostgreSQL stopped"
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\n{submitter.summary()}\n{stack.diagnostics()}"
