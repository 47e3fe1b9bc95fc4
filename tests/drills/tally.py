"""Counting a drill's outcome: runs lost, and runs executed twice, from the database and the agents' own log."""

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from agents.models import RunStatus
from tests.drills.executions import Execution
from tests.drills.stack import Database, RunRow

IN_FLIGHT = {RunStatus.QUEUED, RunStatus.RUNNING}
# Once every run is terminal, a little longer for any execution still (wrongly) going on to show in the log.
SETTLE_SECONDS = 2


def settled(database: Database, *, seconds: float) -> dict[str, RunRow]:
    """The drill's runs once none is queued or running, or as they stand after `seconds`."""
    deadline = time.monotonic() + seconds
    rows: dict[str, RunRow] = {}
    while True:
        try:
            rows = database.runs()
        except psycopg.OperationalError:
            pass
        else:
            if not any(row.status in IN_FLIGHT for row in rows.values()):
                break
        if time.monotonic() > deadline:
            return rows
        time.sleep(0.5)
    time.sleep(SETTLE_SECONDS)
    return database.runs()


@dataclass
class Tally:
    """`lost`: runs accepted or stored that did not succeed, or succeeded without executing (run id -> why).
    `twice`: runs whose work was done more than once (run id -> times)."""

    accepted: int
    stored: int
    lost: dict[str, str] = field(default_factory=dict)
    twice: dict[str, int] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    # For each run executed twice, its lines in the execution log.
    executions: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"lost {len(self.lost)}, executed twice {len(self.twice)} "
            f"(of {self.accepted} accepted, {self.stored} stored; by status {dict(self.statuses)})"
        ]
        lines += [f"  lost {run_id}: {why}" for run_id, why in list(self.lost.items())[:5]]
        lines += [
            f"  executed {times} times: {run_id} ({self.executions[run_id]})"
            for run_id, times in list(self.twice.items())[:5]
        ]
        return "\n".join(lines)


def tally(
    *, accepted: Iterable[str], rows: dict[str, RunRow], executions: list[Execution], failing: Iterable[str] = ()
) -> Tally:
    """Every accepted run must be stored; every stored run must succeed once, except those `failing` on
    purpose, which must be called once."""
    accepted, failing = set(accepted), set(failing)
    done = Counter(execution.run_id for execution in executions if execution.event == "done")
    started = Counter(execution.run_id for execution in executions if execution.event == "start")
    result = Tally(accepted=len(accepted), stored=len(rows), statuses=Counter(row.status for row in rows.values()))
    for run_id in sorted(accepted - rows.keys()):
        result.lost[run_id] = "accepted (201) but not stored"
    for run_id, row in rows.items():
        if run_id in failing:
            continue
        if row.status != RunStatus.SUCCEEDED:
            result.lost[run_id] = f"{row.status} ({row.error_type}) after {row.attempts} attempts, tier {row.tier}"
        elif not done[run_id]:
            result.lost[run_id] = "succeeded without ever executing"
    result.twice = {run_id: times for run_id, times in done.items() if times > 1}
    result.twice |= {run_id: started[run_id] for run_id in failing if started[run_id] > 1}
    for run_id in result.twice:
        result.executions[run_id] = ", ".join(
            f"{execution.event} attempt {execution.attempt} in pid {execution.pid}"
            for execution in executions
            if execution.run_id == run_id
        )
    return result
