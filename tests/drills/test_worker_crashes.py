"""Drills: worker processes killed with SIGKILL while they execute; no run is lost, none is executed twice."""

import pytest

from tests.drills.tally import settled, tally

pytestmark = pytest.mark.slow

TIERS = ("critical", "standard", "batch")
RUNS = 300
# A killed worker must not fail runs that did nothing wrong, even when their agent allows no retry.
AGENT_OF_TIER = {"critical": "drill.count", "standard": "drill.count_retrying", "batch": "drill.count"}
SETTLE_SECONDS = 90
# Where the pool-kill drill puts its longer runs in each tier's batch, and how long they take.
LONG_RUNS = (60, 160, 260)
LONG_RUN_SECONDS = 0.5


def runs(agent: str, tag: str, *, tier: str, seconds: float) -> list[dict]:
    return [{"agent": agent, "input": {"tag": tag, "seconds": seconds}, "tier": tier} for _ in range(RUNS)]


def test_killing_a_pool_process_of_each_tier_loses_no_run_and_executes_none_twice(make_stack, shared_database):
    stack = make_stack("pool-kill", database=shared_database)
    stack.start()
    log = stack.executions
    accepted, in_flight, killed = [], {}, {}

    for tier in TIERS:
        batch = runs(AGENT_OF_TIER[tier], f"pool-kill-{tier}", tier=tier, seconds=0.02)
        # A few longer runs among them, for a process to be killed in the middle of one: a process killed
        # in the instant between its agent's return and the note of the outcome in its spool has that
        # run executed again (runs are at-least-once), and a 20 ms run is in that instant too often.
        for index in LONG_RUNS:
            batch[index]["input"]["seconds"] = LONG_RUN_SECONDS
        ids = stack.submit_batch(batch)
        accepted += ids
        long_runs = {ids[index] for index in LONG_RUNS}
        # Once a process of the tier has finished some work, kill one as it starts a long run, mid-message.
        log.wait_for(lambda run, tier=tier: (run.tier, run.event) == (tier, "done"), what=f"work done on {tier}")
        executing = log.wait_for(
            lambda run, long_runs=long_runs: run.event == "start" and run.run_id in long_runs,
            what=f"a long run started on {tier}",
        )
        in_flight[tier] = shared_database.in_flight(tier)
        killed[tier] = stack.kill_pool_process(tier, executing.pid)
    outcome = tally(accepted=accepted, rows=settled(shared_database, seconds=SETTLE_SECONDS), executions=log.read())

    assert min(in_flight.values()) >= 100, f"runs in flight per tier when its pool process was killed: {in_flight}"
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\nkilled {killed}\n{stack.diagnostics()}"


def test_a_worker_whose_main_process_is_killed_loses_no_run_and_executes_none_twice(make_stack, shared_database):
    # Short leases renewed often, so that the dead worker's runs are claimed again within seconds.
    stack = make_stack(
        "worker-kill", database=shared_database,
        RUN_LEASE_SECONDS="10", RUN_HEARTBEAT_SECONDS="2", RUN_LEASE_GRACE_SECONDS="5",
    )  # fmt: skip
    stack.start()
    log = stack.executions

    accepted = stack.submit_batch(runs("drill.count", "worker-kill", tier="standard", seconds=0.05))
    log.wait_for(lambda run: run.tier == "standard", what="an execution on the standard worker")
    in_flight = shared_database.in_flight("standard")
    stack.crash("standard")
    stack.start("standard")
    outcome = tally(accepted=accepted, rows=settled(shared_database, seconds=SETTLE_SECONDS), executions=log.read())

    assert in_flight >= 100, f"only {in_flight} runs were in flight when the worker was killed"
    assert (len(outcome.lost), len(outcome.twice)) == (0, 0), f"{outcome}\n{stack.diagnostics()}"
