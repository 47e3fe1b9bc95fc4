"""The lease on a claimed run: which runs each process of a worker holds, and the heartbeat that keeps
their leases alive while the worker lives.

A claim lasts `RUN_LEASE_SECONDS`. The worker's main process renews, every `RUN_HEARTBEAT_SECONDS`,
the leases of the runs its pool processes hold, so a run may take as long as its time limit allows
while a dead worker's runs are claimed again within about one lease, whatever their time limits.
The main process renews rather than the process running the agent: an agent busy in native code
never starves the heartbeat, and a process that died renews nothing.
"""

import logging
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from agents.models import Run, RunStatus

logger = logging.getLogger(__name__)


class HoldingBoard:
    """Which runs each process of this worker's pool holds, and which one it is executing, readable by
    the worker's main process.

    Anonymous shared memory mapped before the pool forks, one slot per process: a process writes the
    runs it claimed and the one it is calling. The main process reads it to renew their leases, and,
    when the pool kills a process at its hard time limit or finds it dead, to tell which run it was
    executing: the message's other runs did not cause it.
    """

    SLOTS = 1024
    HEAD = struct.Struct("<I16sH")
    RUN_ID = struct.Struct("<16s")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slot_size = self.HEAD.size + capacity * self.RUN_ID.size
        self._memory = mmap.mmap(-1, self.SLOTS * self.slot_size)

    def _offset(self, pid: int) -> int:
        return (pid % self.SLOTS) * self.slot_size

    def hold(self, run_ids: Sequence[uuid.UUID]) -> None:
        """This process now holds `run_ids` (an empty sequence: none), executing none of them yet."""
        pid, offset = os.getpid(), self._offset(os.getpid())
        held = list(run_ids)[: self.capacity]
        self.HEAD.pack_into(self._memory, offset, pid, bytes(16), len(held))
        for index, run_id in enumerate(held):
            self.RUN_ID.pack_into(self._memory, offset + self.HEAD.size + index * self.RUN_ID.size, run_id.bytes)

    def executing_now(self, run_id: uuid.UUID | None) -> None:
        """This process is calling the agent of `run_id` (None: of no run)."""
        pid, offset = os.getpid(), self._offset(os.getpid())
        slot_pid, _, count = self.HEAD.unpack_from(self._memory, offset)
        self.HEAD.pack_into(
            self._memory, offset, pid, run_id.bytes if run_id else bytes(16), count if slot_pid == pid else 0
        )

    def executing(self, pid: int | None) -> uuid.UUID | None:
        """The run the process `pid` was executing, if it was executing one."""
        if not pid:
            return None
        slot_pid, raw, _ = self.HEAD.unpack_from(self._memory, self._offset(pid))
        return uuid.UUID(bytes=raw) if slot_pid == pid and any(raw) else None

    def held(self, pids: Iterable[int]) -> list[uuid.UUID]:
        """The runs held by the processes `pids`."""
        runs = []
        for pid in pids:
            offset = self._offset(pid)
            slot_pid, _, count = self.HEAD.unpack_from(self._memory, offset)
            if slot_pid != pid:
                continue
            for index in range(min(count, self.capacity)):
                (raw,) = self.RUN_ID.unpack_from(self._memory, offset + self.HEAD.size + index * self.RUN_ID.size)
                runs.append(uuid.UUID(bytes=raw))
        return runs


board = HoldingBoard(capacity=settings.RUN_MESSAGE_MAX_RUNS)


def lease_until() -> "timezone.datetime":
    return timezone.now() + timedelta(seconds=settings.RUN_LEASE_SECONDS)


def leases_renew(*, worker: str, run_ids: Sequence[uuid.UUID]) -> int:
    """Extend the leases of the runs `worker` still holds among `run_ids`; returns how many."""
    if not run_ids:
        return 0
    return Run.objects.filter(pk__in=run_ids, status=RunStatus.RUNNING, worker=worker).update(
        lease_expires_at=lease_until()
    )


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc), and `pid` itself for pools that run in-process."""
    children = [pid]
    # Any thread of the main process may have forked a pool process.
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in task.read_text().split()]
        except OSError:
            continue
    return children


class Heartbeat(threading.Thread):
    """Renews the leases of the runs this worker's processes hold, until the worker stops."""

    def __init__(self, worker: str) -> None:
        super().__init__(name="run-lease-heartbeat", daemon=True)
        self.worker = worker
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(settings.RUN_HEARTBEAT_SECONDS):
            # Drops a connection the database closed (an outage, a restart) before the beat uses it.
            close_old_connections()
            self.beat()

    def beat(self) -> int:
        """Renew once; a database that does not answer is logged, and the next beat tries again."""
        try:
            return leases_renew(worker=self.worker, run_ids=board.held(_children(os.getpid())))
        except DatabaseError as exc:
            # The next beat tries again; a lease outlives a few missed beats.
            logger.warning("could not renew run leases of %s: %s", self.worker, exc)
            return 0


def heartbeat_on_worker_ready(sender, **kwargs) -> None:
    """Start the heartbeat in the worker's main process."""
    hostname = getattr(sender, "hostname", None)
    if hostname:
        Heartbeat(worker=hostname).start()
