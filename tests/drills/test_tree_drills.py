"""Drills on a tree of runs (multi-agent work): a root delegating to ten runs that each delegate to ten leaves
(111 runs) completes, with every step's work done once, through a worker killed mid-step, Redis restarted
empty mid-tree and the web server restarted mid-tree.

"Once" is counted in the drill agents' own log (tree_agents.py): every leaf's work done exactly once, every
inner run's delegating step and its continuation each done exactly once. An attempt killed before its work
was done (a `start` line without a `done`) and then done by a later attempt is what recovery is for; a
second `done` for one step of one run is work done twice.
"""

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import psycopg
import pytest

from agents.models import Run, RunStatus
from tests.drills.executions import Execution
from tests.drills.stack import Database, Stack
from tests.drills.tally import SETTLE_SECONDS
from tests.drills.tree_agents import DELEGATE, GATHER, LEAF

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FANOUTS = [10, 10]
RUNS = 1 + 10 + 100
LEAVES = math.prod(FANOUTS)
# Long enough that a fault lands in the middle of a leaf's work, short enough for 100 leaves on two processes.
LEAF_SECONDS = 0.2
# The fault comes once this many leaves are done: the tree is well under way, most of it still to do.
LEAVES_BEFORE_FAULT = 15
TREE_SECONDS = 150
STEPS_OF_LEAF = (LEAF,)
STEPS_OF_INNER = (DELEGATE, GATHER)


@dataclass(frozen=True)
class TreeRow:
    """One run of the tree as the database holds it."""

    id: str
    parent: str | None
    status: str
    fanouts: list[int]
    leaves: int | None
    error: str | None
    attempts: int
    lost_attempts: int
    round: int
    pending_children: int

    def __str__(self) -> str:
        kind = "leaf" if not self.fanouts else f"inner {self.fanouts}"
        return (
            f"{kind} {self.status} (error {self.error}), attempts {self.attempts} (lost {self.lost_attempts}), "
            f"round {self.round}, pending children {self.pending_children}"
        )


def tree_rows(database: Database) -> dict[str, TreeRow]:
    """Every run of the drill's database (a drill's database holds that drill's tree only)."""
    sql = (
        "SELECT id, parent_id, status, input->'fanouts', (result->>'leaves')::int, "
        "error->>'type' || ': ' || coalesce(error->>'message', ''), attempts, lost_attempts, round, "
        f"pending_children FROM {Run._meta.db_table}"
    )
    with psycopg.connect(database.url, connect_timeout=5) as connection:
        return {str(row[0]): TreeRow(str(row[0]), row[1] and str(row[1]), *row[2:]) for row in connection.execute(sql)}


def tree_settled(database: Database, root: str, *, seconds: float = TREE_SECONDS) -> dict[str, TreeRow]:
    """The tree once its root has ended, or as it stands after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            rows = tree_rows(database)
        except psycopg.OperationalError:
            rows = {}
        if root in rows and rows[root].status in RunStatus.terminal():
            break
        time.sleep(0.5)
    # A little longer for any execution still (wrongly) going on to show in the log.
    time.sleep(SETTLE_SECONDS)
    return tree_rows(database)


@dataclass
class TreeTally:
    """`lost`: runs that did not succeed, or a step of theirs never done (run id -> why). `twice`: steps done
    more than once (run id -> which, with its log lines). `misshapen`: runs whose children or count are not
    the tree's."""

    stored: int
    lost: dict[str, str] = field(default_factory=dict)
    twice: dict[str, str] = field(default_factory=dict)
    misshapen: dict[str, str] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def failures(self) -> tuple[int, int, int]:
        return len(self.lost), len(self.twice), len(self.misshapen)

    def __str__(self) -> str:
        lines = [
            f"lost {len(self.lost)}, executed twice {len(self.twice)}, misshapen {len(self.misshapen)} "
            f"(of {self.stored} runs stored, {RUNS} expected; by status {dict(self.statuses)})"
        ]
        for label, found in (("lost", self.lost), ("executed twice", self.twice), ("misshapen", self.misshapen)):
            lines += [f"  {label} {run_id}: {why}" for run_id, why in list(found.items())[:5]]
        return "\n".join(lines)


def tree_tally(*, root: str, rows: dict[str, TreeRow], executions: list[Execution]) -> TreeTally:
    """Every run of the tree must succeed with its count of leaves, each of its steps done exactly once."""
    done: Counter[tuple[str, str]] = Counter()
    lines: dict[str, list[str]] = defaultdict(list)
    for execution in executions:
        step, _, phase = execution.event.partition(".")
        done[execution.run_id, step] += phase == "done"
        lines[execution.run_id].append(f"{execution.event} attempt {execution.attempt} in pid {execution.pid}")
    children = Counter(row.parent for row in rows.values() if row.parent is not None)
    outcome = TreeTally(stored=len(rows), statuses=Counter(row.status for row in rows.values()))
    if root not in rows:
        outcome.lost[root] = "the root was not stored"
    for run_id, row in rows.items():
        if row.status != RunStatus.SUCCEEDED:
            outcome.lost[run_id] = str(row)
        for step in STEPS_OF_INNER if row.fanouts else STEPS_OF_LEAF:
            if row.status == RunStatus.SUCCEEDED and not done[run_id, step]:
                outcome.lost[run_id] = f"succeeded without its {step} step ever done: {row}"
            if done[run_id, step] > 1:
                outcome.twice[run_id] = f"{step} done {done[run_id, step]} times ({', '.join(lines[run_id])})"
        if row.status == RunStatus.SUCCEEDED and row.leaves != math.prod(row.fanouts):
            outcome.misshapen[run_id] = f"counted {row.leaves} leaves below it, not {math.prod(row.fanouts)}: {row}"
        if children[run_id] != (row.fanouts[0] if row.fanouts else 0):
            outcome.misshapen[run_id] = f"{children[run_id]} children: {row}"
    if len(rows) != RUNS:
        outcome.misshapen["tree"] = f"{len(rows)} runs stored, not {RUNS}"
    return outcome


def submit_tree(stack: Stack, tag: str) -> str:
    body = {"agent": "drill.tree", "input": {"tag": tag, "fanouts": FANOUTS, "seconds": LEAF_SECONDS}}
    status, run = stack.call("POST", "/api/v1/runs/", body)
    assert status == 201, f"the tree's root was answered {status}: {str(run)[:500]}"
    return run["id"]


def leaves_done(stack: Stack) -> int:
    return sum(execution.event == f"{LEAF}.done" for execution in stack.executions.read())


def when_under_way(stack: Stack, *, leaves: int = LEAVES_BEFORE_FAULT) -> Counter[str]:
    """Once `leaves` leaves are done: the tree's runs by status."""
    deadline = time.monotonic() + TREE_SECONDS
    while leaves_done(stack) < leaves:
        if time.monotonic() > deadline:
            raise AssertionError(f"{leaves} leaves were not done within {TREE_SECONDS}s\n{stack.diagnostics()}")
        time.sleep(0.05)
    return Counter(row.status for row in tree_rows(stack.database).values())


def executing_leaf(stack: Stack, worker: str) -> Execution:
    """A leaf a pool process of `worker` is working on now (its work started, not done)."""
    pool = {pid for pid, _ in stack.pool(worker)}
    deadline = time.monotonic() + TREE_SECONDS
    while time.monotonic() < deadline:
        executions = stack.executions.read()
        finished = {(run.run_id, run.attempt) for run in executions if run.event == f"{LEAF}.done"}
        working = [
            run
            for run in executions
            if run.event == f"{LEAF}.start" and run.pid in pool and (run.run_id, run.attempt) not in finished
        ]
        if working:
            return working[-1]
        time.sleep(0.01)
    raise AssertionError(f"no pool process of the {worker} worker was working on a leaf")


def assert_under_way(statuses: Counter[str], done: int) -> None:
    """The fault landed mid-tree: the root and some inner runs waiting, most leaves still to do."""
    assert statuses[RunStatus.WAITING] >= 2, f"runs by status at the fault: {dict(statuses)}"
    assert done <= LEAVES // 2, f"{done} of {LEAVES} leaves were already done at the fault"


def test_a_tree_completes_once_per_step_through_a_pool_process_then_its_whole_worker_killed_mid_leaf(
    make_stack, shared_database
):
    # Short leases renewed often, so that the dead worker's runs are claimed again within seconds.
    stack = make_stack("tree-worker-kill", database=shared_database, RUN_LEASE_SECONDS="10", RUN_HEARTBEAT_SECONDS="2")
    stack.start()
    root = submit_tree(stack, "tree-worker-kill")

    statuses = when_under_way(stack)
    leaf = executing_leaf(stack, "standard")
    done_at_fault = leaves_done(stack)
    killed = stack.kill_pool_process("standard", leaf.pid)
    # Then, while the tree is still under way, the worker dies whole (main process and pool).
    second = executing_leaf(stack, "standard")
    stack.crash("standard")
    stack.start("standard")
    outcome = tree_tally(root=root, rows=tree_settled(shared_database, root), executions=stack.executions.read())

    assert_under_way(statuses, done_at_fault)
    message = f"{outcome}\nkilled {killed} working on {leaf}, then the worker working on {second}"
    assert outcome.failures == (0, 0, 0), f"{message}\n{stack.diagnostics()}"


def test_a_tree_completes_once_per_step_through_redis_restarted_empty_mid_tree(
    make_stack, shared_database, private_redis
):
    stack = make_stack("tree-redis-restart", database=shared_database, redis_url=private_redis.url)
    stack.start()
    root = submit_tree(stack, "tree-redis-restart")

    statuses = when_under_way(stack)
    done_at_fault = leaves_done(stack)
    private_redis.crash()
    private_redis.start()
    outcome = tree_tally(root=root, rows=tree_settled(shared_database, root), executions=stack.executions.read())

    assert_under_way(statuses, done_at_fault)
    assert outcome.failures == (0, 0, 0), f"{outcome}\n{stack.diagnostics()}"


def test_a_tree_completes_once_per_step_through_the_web_server_restarted_and_shows_whole_in_the_api(
    make_stack, shared_database
):
    stack = make_stack("tree-web-restart", database=shared_database)
    stack.start()
    root = submit_tree(stack, "tree-web-restart")

    statuses = when_under_way(stack)
    done_at_fault = leaves_done(stack)
    stack.crash("web")
    stack.start("web")
    deadline, tree = time.monotonic() + TREE_SECONDS, None
    while time.monotonic() < deadline:
        status, tree = stack.call("GET", f"/api/v1/runs/{root}/tree/")
        if status == 200 and tree["runs"][0]["status"] in RunStatus.terminal():
            break
        time.sleep(0.5)
    outcome = tree_tally(root=root, rows=tree_settled(shared_database, root), executions=stack.executions.read())

    assert_under_way(statuses, done_at_fault)
    assert outcome.failures == (0, 0, 0), f"{outcome}\n{stack.diagnostics()}"
    assert status == 200, f"the tree view answered {status} after the restart: {str(tree)[:500]}"
    shown = Counter(run["status"] for run in tree["runs"])
    assert (tree["root"], tree["count"], tree["truncated"], shown) == (root, RUNS, False, {"succeeded": RUNS}), tree
