"""Drill: the web server killed with SIGKILL in the middle of large batch submissions; each batch is stored
whole or not at all, and every stored run executes once."""

import itertools
import threading
import time
from collections import Counter

import pytest

from tests.drills.stack import Stack
from tests.drills.tally import settled, tally

pytestmark = pytest.mark.slow

BATCH = 1000
CLIENTS = 2
SETTLE_SECONDS = 90


class BatchClient(threading.Thread):
    """Submits batches of BATCH runs back to back, each marked by its own tag, until one gets no 201."""

    def __init__(self, stack: Stack, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stack = stack
        self.answers: dict[str, tuple[int | None, list[str], float]] = {}
        self.sending: tuple[str, float] | None = None

    def run(self) -> None:
        for n in itertools.count():
            tag = f"{self.name}-{n}"
            runs = [{"agent": "drill.count", "input": {"tag": tag}} for _ in range(BATCH)]
            began = time.monotonic()
            self.sending = (tag, began)
            status, body = self.stack.call("POST", "/api/v1/runs/batch/", {"runs": runs}, timeout=120)
            ids = [run["id"] for run in body] if status == 201 else []
            self.answers[tag] = (status, ids, time.monotonic() - began)
            if status != 201:
                return


def test_a_web_server_killed_mid_batch_stores_each_batch_whole_or_not_at_all_and_executes_it_once(
    make_stack, shared_database
):
    stack = make_stack("web-kill", database=shared_database)
    stack.start()
    clients = [BatchClient(stack, f"web-kill-{n}") for n in range(CLIENTS)]
    for client in clients:
        client.start()

    # Once two batches were answered, kill the web server about halfway through a batch of the first client
    # (the clients send back to back, so a batch is always on its way).
    while sum(len(client.answers) for client in clients) < 2:
        time.sleep(0.01)
    durations = [duration for client in clients for _, _, duration in client.answers.values()]
    _, began = clients[0].sending
    time.sleep(max(0.0, began + sum(durations) / len(durations) / 2 - time.monotonic()))
    in_flight = shared_database.in_flight()
    stack.crash("web")
    for client in clients:
        client.join(timeout=150)
    answers = {tag: answer for client in clients for tag, answer in client.answers.items()}
    rows = settled(shared_database, seconds=SETTLE_SECONDS)
    stored = Counter(row.tag for row in rows.values())
    torn = {tag: stored[tag] for tag in answers if stored[tag] not in (0, BATCH)}
    unanswered = [tag for tag, (status, _, _) in answers.items() if status is None]
    outcome = tally(
        accepted=[run_id for _, ids, _ in answers.values() for run_id in ids],
        rows=rows,
        executions=stack.executions.read(),
    )

    assert unanswered, f"the web server was not killed during a batch: {answers}"
    assert in_flight >= 100, f"only {in_flight} runs were in flight when the web server was killed"
    assert (torn, len(outcome.lost), len(outcome.twice)) == ({}, 0, 0), (
        f"batches stored in part {torn} (of {BATCH} runs each); {outcome}\n"
        f"batches stored: {dict(stored)}; without an answer: {unanswered}\n{stack.diagnostics()}"
    )
