"""Drill: the broker's Redis restarted empty while runs are queued and running; no run is lost, none is
executed twice."""

import pytest

from agents.models import RunStatus
from tests.drills.tally import settled, tally

pytestmark = pytest.mark.slow

SETTLE_SECONDS = 90


def runs(count: int, tag: str, *, tier: str, seconds: float) -> list[dict]:
    return [{"agent": "drill.count", "input": {"tag": tag, "seconds": seconds}, "tier": tier} for _ in range(count)]


def test_redis_restarted_empty_with_runs_queued_and_running_loses_no_run_and_executes_none_twice(
    make_stack, shared_database, private_redis
):
    stack = make_stack("redis-restart", database=shared_database, redis_url=private_redis.url)
    stack.start()
    log = stack.executions
    accepted = stack.submit_batch(runs(300, "redis-restart-standard", tier="standard", seconds=0.05))
    accepted += stack.submit_batch(runs(200, "redis-restart-batch", tier="batch", seconds=0.02))
    log.wait_for(lambda run: run.tier == "standard", what="an execution on the standard worker")

    statuses = shared_database.statuses()
    private_redis.crash()
    private_redis.start()
    # Work keeps arriving once Redis is back; a refused submission is not lost, an accepted one must run.
    accepted += stack.submit_batch(runs(100, "redis-restart-after", tier="standard", seconds=0.01))
    outcome = tally(accepted=accepted, rows=settled(shared_database, seconds=SETTLE_SECONDS), executions=log.read())

    assert statuses[RunStatus.QUEUED] >= 100, f"runs by status when Redis was restarted: {dict(statuses)}"
    assert statuses[RunStatus.RUNNING] >= 1, f"runs by status when Redis was restarted: {dict(statuses)}"
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\n{stack.diagnostics()}"


def test_a_worker_holding_an_unacknowledged_message_stays_up_when_redis_restarts(
    make_stack, shared_database, private_redis
):
    # The worker runs one run (its message unacknowledged until the run ends) and waits on the broker for more:
    # the connection it loses then holds both a delivered message and a pending read.
    stack = make_stack("redis-restart-holding", database=shared_database, redis_url=private_redis.url)
    stack.start("web", "standard")
    accepted = stack.submit_batch(runs(1, "redis-restart-holding", tier="standard", seconds=3))
    stack.executions.wait_for(lambda run: run.event == "start", what="the run starting")

    private_redis.crash()
    private_redis.start()
    accepted += stack.submit_batch(runs(1, "redis-restart-holding-after", tier="standard", seconds=0.01))
    outcome = tally(accepted=accepted, rows=settled(shared_database, seconds=30), executions=stack.executions.read())

    assert stack.processes["standard"].alive(), stack.diagnostics()
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\n{stack.diagnostics()}"
