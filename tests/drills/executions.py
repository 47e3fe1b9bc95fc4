"""The drill agents' own record of their executions: a file outside PostgreSQL and Redis, since a drill
breaks one or the other.

A `start` line is written when an agent is called and a `done` line when its work is complete, each with
the run id, the attempt, the process id and the tier. A killed attempt leaves a `start` without a `done`;
a second `done` for one run is work done twice.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOG_DIR_VARIABLE = "DRILL_LOG_DIR"
LOG_NAME = "executions.log"


def execution_log(directory: str | os.PathLike) -> Path:
    """The file the drill agents append to in processes given `directory` in DRILL_LOG_DIR."""
    return Path(directory) / LOG_NAME


def note(event: str, ctx) -> None:
    """Append one line for this run; O_APPEND makes a short write atomic among processes."""
    directory = os.environ.get(LOG_DIR_VARIABLE)
    if not directory:
        raise RuntimeError(f"{LOG_DIR_VARIABLE} is not set: drill agents run only in a drill's processes")
    line = f"{event} {ctx.run_id} {ctx.attempt} {os.getpid()} {ctx.run.tier}\n".encode()
    fd = os.open(execution_log(directory), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Execution:
    """One line of the drill agents' log: `start` when an agent is called, `done` when its work is complete."""

    event: str
    run_id: str
    attempt: int
    pid: int
    tier: str


class ExecutionLog:
    """Reads the log the drill agents of one stack write."""

    def __init__(self, directory: Path) -> None:
        self.path = execution_log(directory)

    def read(self) -> list[Execution]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        executions = []
        # The last line may be in the middle of being written: only whole lines count.
        for line in text.split("\n")[:-1]:
            event, run_id, attempt, pid, tier = line.split()
            executions.append(Execution(event, run_id, int(attempt), int(pid), tier))
        return executions

    def wait_for(self, found: Callable[[Execution], bool], *, what: str, seconds: float = 60) -> Execution:
        """The first execution line `found` accepts, as soon as one is written."""
        deadline = time.monotonic() + seconds
        while True:
            match = next((execution for execution in self.read() if found(execution)), None)
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not happen within {seconds:g}s")
            time.sleep(0.02)
