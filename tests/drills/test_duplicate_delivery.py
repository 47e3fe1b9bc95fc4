"""Drill: every message of a tier delivered twice, while its runs are queued and while they run; each run
executes once."""

from types import SimpleNamespace

import pytest

from agents.runs.dispatch import message_time_limit
from tests.drills.tally import settled, tally

pytestmark = pytest.mark.slow

RUNS = 100
SETTLE_SECONDS = 90


def runs(tag: str) -> list[dict]:
    return [{"agent": "drill.count", "input": {"tag": tag, "seconds": 0.02}, "tier": "standard"} for _ in range(RUNS)]


def test_runs_whose_messages_are_delivered_twice_each_execute_once(make_stack, shared_database):
    stack = make_stack("duplicates", database=shared_database)
    # The standard worker starts once both messages wait in its queue.
    stack.start(*[name for name in stack.names if name != "standard"])
    log = stack.executions
    first = stack.submit_batch(runs("duplicates-first"))
    second = stack.submit_batch(runs("duplicates-second"))
    (message, first_ids), (_, second_ids) = stack.queued_messages("standard")
    assert (first_ids, second_ids) == (first, second), "each batch travels in one message"

    # The first message is delivered again byte for byte, as the broker redelivers one, while both are queued.
    stack.deliver_again("standard", message)
    in_flight = shared_database.in_flight("standard")
    stack.start("standard")
    # The second message's runs are dispatched again, as the platform builds a message, while they run.
    log.wait_for(lambda run: run.run_id in set(second), what="an execution of the second message")
    _, agent = stack.call("GET", "/api/v1/agents/drill.count/")
    limit = message_time_limit([SimpleNamespace(time_limit=agent["time_limit"])] * RUNS)
    stack.publish(second, queue="standard", time_limit=limit)
    rows = settled(shared_database, seconds=SETTLE_SECONDS)
    outcome = tally(accepted=first + second, rows=rows, executions=log.read())

    assert in_flight >= 2 * RUNS, f"only {in_flight} runs were queued when the first message was delivered again"
    assert stack.queue_length("standard") == 0, "some messages were never delivered"
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\n{stack.diagnostics()}"
