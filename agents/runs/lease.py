"""The lease on a claimed run: which runs each process of a worker holds, and the heartbeat that keeps
their leases alive while the worker lives.

A claim lasts `RUN_LEASE_SECONDS`. The worker's main process renews, every `RUN_HEARTBEAT_SECONDS`,
the leases of the runs its pool processes hold, so a run may take as long as its time limit allows
while a dead worker's runs are claimed again within about one lease, whatever their time limits.
The main process renews rather than the process running the agent: an agent busy in native code
never starves the heartbeat, and a process that died renews nothing.
"""

import contextlib
import functools
import logging
import mmap
import os
import signal
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
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
    # pid, the run being executed, how many runs are held, the executed run's hard deadline (epoch
    # seconds, 0 for none), and whether the main process killed the process for passing it.
    HEAD = struct.Struct("<I16sHdB")
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
        self.HEAD.pack_into(self._memory, offset, pid, bytes(16), len(held), 0.0, 0)
        for index, run_id in enumerate(held):
            self.RUN_ID.pack_into(self._memory, offset + self.HEAD.size + index * self.RUN_ID.size, run_id.bytes)

    def executing_now(self, run_id: uuid.UUID | None, *, deadline: float = 0.0) -> None:
        """This process is calling the agent of `run_id` (None: of no run), which must end by `deadline`."""
        pid, offset = os.getpid(), self._offset(os.getpid())
        slot_pid, _, count, _, _ = self.HEAD.unpack_from(self._memory, offset)
        self.HEAD.pack_into(
            self._memory, offset, pid, run_id.bytes if run_id else bytes(16), count if slot_pid == pid else 0,
            deadline if run_id else 0.0, 0,
        )  # fmt: skip

    def executing(self, pid: int | None) -> uuid.UUID | None:
        """The run the process `pid` was executing, if it was executing one."""
        if not pid:
            return None
        slot_pid, raw, _, _, _ = self.HEAD.unpack_from(self._memory, self._offset(pid))
        return uuid.UUID(bytes=raw) if slot_pid == pid and any(raw) else None

    def overdue(self, pid: int, *, now: float) -> uuid.UUID | None:
        """The run the process `pid` has been executing past its hard deadline, not yet killed for it."""
        slot_pid, raw, _, deadline, killed = self.HEAD.unpack_from(self._memory, self._offset(pid))
        if slot_pid != pid or not any(raw) or not deadline or killed or now < deadline:
            return None
        return uuid.UUID(bytes=raw)

    def mark_killed(self, pid: int) -> None:
        offset = self._offset(pid)
        slot_pid, raw, count, deadline, _ = self.HEAD.unpack_from(self._memory, offset)
        if slot_pid == pid:
            self.HEAD.pack_into(self._memory, offset, slot_pid, raw, count, deadline, 1)

    def killed(self, pid: int | None) -> bool:
        """Whether the main process killed the process `pid` for running past a hard deadline."""
        if not pid:
            return False
        slot_pid, _, _, _, killed = self.HEAD.unpack_from(self._memory, self._offset(pid))
        return slot_pid == pid and bool(killed)

    def holders(self) -> list[int]:
        """The processes that hold runs now, as far as the board knows (a dead one stays until forgotten)."""
        pids = []
        for slot in range(self.SLOTS):
            slot_pid, _, count, _, _ = self.HEAD.unpack_from(self._memory, slot * self.slot_size)
            if slot_pid and count:
                pids.append(slot_pid)
        return pids

    def forget(self, pid: int) -> None:
        """The process `pid` is gone and what it held has been seen to."""
        offset = self._offset(pid)
        if self.HEAD.unpack_from(self._memory, offset)[0] == pid:
            self.HEAD.pack_into(self._memory, offset, 0, bytes(16), 0, 0.0, 0)

    def held(self, pids: Iterable[int]) -> list[uuid.UUID]:
        """The runs held by the processes `pids`."""
        runs = []
        for pid in pids:
            offset = self._offset(pid)
            slot_pid, _, count, _, _ = self.HEAD.unpack_from(self._memory, offset)
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


def pool_processes() -> list[int]:
    """The live pool processes of this worker (and this process, for pools that run agents in it)."""
    return _children(os.getpid())


class Heartbeat(threading.Thread):
    """Renews the leases of the runs this worker's processes hold, until the worker stops; hands a process
    that died holding runs to `on_process_died`."""

    def __init__(self, worker: str, on_process_died: Callable[[int], None] | None = None) -> None:
        super().__init__(name="run-lease-heartbeat", daemon=True)
        self.worker = worker
        self.on_process_died = on_process_died
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(settings.RUN_HEARTBEAT_SECONDS):
            # Drops a connection the database closed (an outage, a restart) before the beat uses it.
            close_old_connections()
            self.beat()

    def beat(self) -> int:
        """Renew once; a database that does not answer is logged, and the next beat tries again."""
        live = _children(os.getpid())
        if self.on_process_died is not None:
            # Celery tells of a process that died mid-message only once it knew the process had started it;
            # a message sent to a process killed before that goes to another process, and what the dead one
            # held would wait out its lease.
            for pid in set(board.holders()) - set(live):
                try:
                    self.on_process_died(pid)
                except Exception:
                    # Left on the board: the next beat tries again.
                    logger.exception("could not see to the runs of %s's dead process %s", self.worker, pid)
        try:
            return leases_renew(worker=self.worker, run_ids=board.held(live))
        except DatabaseError as exc:
            # The next beat tries again; a lease outlives a few missed beats.
            logger.warning("could not renew run leases of %s: %s", self.worker, exc)
            return 0


class Watchdog(threading.Thread):
    """Kills a pool process whose agent runs past its run's hard time limit.

    Each run has its own limit, whatever else its message carries, and only an agent's own code is
    ever stopped this way: a process recording outcomes (retrying through a database outage, say)
    executes no run. The main process then learns from the board that the kill was for the time
    limit, and fails that run alone (see execute.message_lost).
    """

    def __init__(self) -> None:
        super().__init__(name="run-hard-limit-watchdog", daemon=True)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(settings.RUN_WATCHDOG_SECONDS):
            self.check()

    def check(self) -> list[int]:
        """Kill the pool processes past their run's hard deadline; returns their pids."""
        killed, me, now = [], os.getpid(), time.time()
        for pid in _children(me):
            # A pool that runs agents in this very process (solo, threads) is left to Celery's own limit.
            if pid == me or board.overdue(pid, now=now) is None:
                continue
            board.mark_killed(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                logger.warning("killed pool process %s: its run passed its hard time limit", pid)
        return killed


def heartbeat_on_worker_ready(sender, **kwargs) -> None:
    """Start the heartbeat and the hard-limit watchdog in the worker's main process."""
    # Imported here: the run's execution uses this module's board.
    from agents.runs.execute import pool_process_died

    hostname = getattr(sender, "hostname", None)
    if hostname:
        Heartbeat(worker=hostname, on_process_died=functools.partial(pool_process_died, worker=hostname)).start()
        Watchdog().start()
