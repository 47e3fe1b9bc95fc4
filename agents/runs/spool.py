"""Outcomes a pool process has reached but not yet written, kept where its worker's main process finds them.

A worker writes a message's outcomes together, when the message is done. Until then each finished
attempt is also appended to a small file of the process's own (on a tmpfs by default), so that if
the process dies (killed, or past a run's hard limit), the worker's main process records what the
process had reached instead of having those runs executed again. The file is emptied once the
outcomes are written.
"""

import json
import os
import re
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings

from agents.models import Run
from agents.runs.delegation import Child, Delegation
from agents.runs.finish import Attempt

UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class OutcomeSpool:
    """The spool of one pool process of one worker."""

    def __init__(self, *, worker: str, pid: int) -> None:
        self.path = Path(settings.RUN_SPOOL_DIR) / f"agentplatform-{UNSAFE.sub('_', worker)}-{pid}.jsonl"
        self._file = None

    @classmethod
    def of_this_process(cls, worker: str) -> "OutcomeSpool":
        return cls(worker=worker, pid=os.getpid())

    def begin(self, *, claimed_at: datetime) -> None:
        """A new message: what an earlier one left is written already; note which claim these attempts hold."""
        self._file = self.path.open("w")
        self._file.write(json.dumps({"claimed_at": claimed_at.isoformat()}) + "\n")
        self._file.flush()

    def add(self, attempt: Attempt) -> None:
        entry = {
            "run": str(attempt.run.pk),
            "started_at": attempt.started_at.isoformat(),
            "finished_at": attempt.finished_at.isoformat(),
            "run_ms": attempt.run_ms,
            "result": attempt.result,
            "error": attempt.error,
            "retryable": attempt.retryable,
            "log": attempt.log,
            "delegation": _delegation_record(attempt.delegation) if attempt.delegation is not None else None,
        }
        # One write of one line: a process killed mid-write leaves at most a last line cut short.
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def clear(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)

    def read(self) -> tuple[datetime | None, list[dict[str, Any]]]:
        """The claim a dead process held and the attempts it had finished (a line cut short is left out)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return None, []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not entries or "claimed_at" not in entries[0]:
            return None, []
        return datetime.fromisoformat(entries[0]["claimed_at"]), entries[1:]


def _delegation_record(delegation: Delegation) -> dict[str, Any]:
    """The delegation as JSON takes it: its fields, and each child's. Shallow, where asdict() copies every
    value of every child's input first (a large fan-out spent more on that than on inserting its children)."""
    record = {field.name: getattr(delegation, field.name) for field in fields(Delegation)}
    record["children"] = [
        {field.name: getattr(child, field.name) for field in CHILD_FIELDS} for child in delegation.children
    ]
    return record


CHILD_FIELDS = fields(Child)


def attempt_from(entry: dict[str, Any], run: Run) -> Attempt:
    """An attempt as a spool line recorded it, for `run` as the database holds it."""
    delegation = entry["delegation"]
    if delegation is not None:
        children = tuple(Child(**child) for child in delegation.pop("children"))
        delegation = Delegation(**delegation, children=children)
    return Attempt(
        run=run,
        started_at=datetime.fromisoformat(entry["started_at"]),
        finished_at=datetime.fromisoformat(entry["finished_at"]),
        run_ms=entry["run_ms"],
        result=entry["result"],
        error=entry["error"],
        retryable=entry["retryable"],
        delegation=delegation,
        log=entry["log"],
    )
