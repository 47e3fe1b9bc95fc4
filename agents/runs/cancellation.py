"""Cancelling a run: a queued run never starts, and the agent of a running one is interrupted.

Cancelling writes the run's final state (see finish) and names the run on a cancel channel.
Each worker process keeps one pub-sub subscription to that channel. When the run it is
executing is named there, the listener signals the main thread, whose handler raises
RunCancelled inside the agent. A signal (rather than an asynchronous exception) also breaks a
blocking call such as time.sleep.
"""

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.errors import RunCancelled, RunNotCancellable
from agents.models import Run, RunStatus
from agents.runs.finish import CANCEL_CHUNK, children_cancelled, run_cancelled, runs_announce

logger = logging.getLogger(__name__)

CANCEL_SIGNAL = signal.SIGUSR2


class CancelWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: str | None = None
        # Cancels that arrived while no run of that id was executing here yet (claim → start).
        self._recent: deque[str] = deque(maxlen=1024)
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()

    def _ensure_listening(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        # Installed for good: a signal landing just after a run ends must find a handler that
        # ignores it, never the default action, which would end the process.
        signal.signal(CANCEL_SIGNAL, self._raise_if_current)
        self._subscribed.clear()
        self._thread = threading.Thread(target=self._listen, name="run-cancel-listener", daemon=True)
        self._thread.start()
        self._subscribed.wait(timeout=2)

    def _listen(self) -> None:
        while True:
            try:
                pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(events.cancel_channel())
                self._subscribed.set()
                for message in pubsub.listen():
                    self._on_cancel(message["data"].decode())
            except Exception:
                logger.exception("cancel listener lost its subscription; resubscribing")
                time.sleep(1)

    def _on_cancel(self, run_id: str) -> None:
        with self._lock:
            self._recent.append(run_id)
            if self._current == run_id:
                signal.pthread_kill(threading.main_thread().ident, CANCEL_SIGNAL)

    def _raise_if_current(self, signum, frame) -> None:
        if self._current is not None:
            raise RunCancelled()

    @contextmanager
    def watching(self, run_id: str) -> Iterator[None]:
        """Within this block, cancelling `run_id` raises RunCancelled in the calling (main) thread."""
        if threading.current_thread() is not threading.main_thread():
            # Signals reach only the main thread; such a pool gets cancellation at claim and finish only.
            yield
            return
        self._ensure_listening()
        with self._lock:
            self._current = run_id
            already = run_id in self._recent
        try:
            if already:
                raise RunCancelled()
            yield
        finally:
            with self._lock:
                self._current = None


cancel_watch = CancelWatch()


def run_cancel(*, run: Run) -> Run:
    """Cancel a queued, running or waiting run and every run below it still in flight; RunNotCancellable if it
    already finished.

    The run is cancelled first, so that nothing below it wakes it meanwhile, and announced after the runs
    below it that this cancels: whoever follows its tree hears them end before the run itself.
    """
    if not run_cancelled(run, announce=False):
        raise RunNotCancellable(run.status)
    try:
        descendants_cancel([run.pk])
    finally:
        runs_announce([run])
    return run


def descendants_cancel(run_ids: Sequence[Any]) -> int:
    """Cancel the runs below the runs `run_ids` (children, theirs, …) that have not ended, one level at a time:
    a few statements and round trips per level and per CANCEL_CHUNK runs in it, not per run."""
    cancelled, level = 0, list(run_ids)
    while level:
        below = []
        for start in range(0, len(level), CANCEL_CHUNK):
            parents = level[start : start + CANCEL_CHUNK]
            cancelled += children_cancelled(parents)
            below += Run.objects.filter(parent_id__in=parents).values_list("pk", flat=True)
        level = below
    return cancelled


def orphans_cancel(limit: int) -> int:
    """Cancel what is still in flight below cancelled runs (a cancel cut short between two levels of its tree,
    by a crash or an outage), for up to `limit` such runs; returns how many runs were cancelled."""
    below = Run.objects.filter(parent__status=RunStatus.CANCELLED).order_by()
    parents: set[Any] = set()
    # Asked apart, each state is found through its own partial index instead of a scan of every run.
    for states in ([RunStatus.QUEUED, RunStatus.RUNNING], [RunStatus.WAITING]):
        parents.update(below.filter(status__in=states).values_list("parent_id", flat=True)[:limit])
    return descendants_cancel(list(parents)) if parents else 0
