"""Drill: an agent hung past its hard time limit among other runs; it fails once, the others succeed once."""

import pytest

from agents.models import RunStatus
from tests.drills.tally import settled, tally

pytestmark = pytest.mark.slow

NORMAL_RUNS = 250
# Early in the batch, so that most of it is still in flight when the agent hangs, and after runs that finish
# within the same slice of the same message.
HUNG_AT = 2
SETTLE_SECONDS = 90


def test_an_agent_hung_past_its_hard_limit_fails_once_and_the_runs_beside_it_succeed_once(make_stack, shared_database):
    stack = make_stack("hard-limit", database=shared_database)
    stack.start()
    log = stack.executions
    batch = [{"agent": "drill.count", "input": {"tag": "hard-limit", "seconds": 0.02}} for _ in range(NORMAL_RUNS)]
    batch.insert(HUNG_AT, {"agent": "drill.hang", "input": {"tag": "hard-limit-hung"}})

    accepted = stack.submit_batch(batch)
    hung = accepted[HUNG_AT]
    log.wait_for(lambda run: run.run_id == hung, what="the hung agent's start")
    in_flight = shared_database.in_flight()
    rows = settled(shared_database, seconds=SETTLE_SECONDS)
    outcome = tally(accepted=accepted, rows=rows, executions=log.read(), failing=[hung])

    assert in_flight >= 100, f"only {in_flight} runs were in flight when the agent hung"
    assert (rows[hung].status, rows[hung].error_type) == (RunStatus.FAILED, "TimeLimitExceeded"), str(rows[hung])
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\n{stack.diagnostics()}"
