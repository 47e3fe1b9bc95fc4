"""Executing the runs of one message on a worker: claim them together, call their agents one after
another, record their outcomes together.

The claim is one `UPDATE … RETURNING` over the message's ids: it takes the runs that are queued
(not following another, not past their expiry) or running on a lease that expired, and a lost
claim means a duplicate delivery, a cancelled, expired or finished run: that run is skipped.
Outcomes are written in one bulk UPDATE when the message is done (see finish). A message that has
run for longer than its slice hands the runs it has not started back to the queue, split in two
messages, so that slow runs spread over the pool while fast ones keep travelling together.
"""

import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from django.db.models import F, Q
from django.utils import timezone
from pydantic import BaseModel

from agentplatform import events
from agentplatform.redis_client import redis_client
from agents.errors import AgentNotRegistered, RunCancelled
from agents.models import Agent, Run, RunStatus
from agents.registry import registry
from agents.runs.cancellation import cancel_watch
from agents.runs.context import RunContext
from agents.runs.delegation import ChildFailed, Delegation, resumed, run_delegate
from agents.runs.dispatch import messages_received, messages_restored, run_dispatch
from agents.runs.finish import Attempt, attempt_lost, attempts_record, runs_expire, slots_free, worker_lost
from agents.runs.lease import board, lease_until
from agents.runs.rows import RowReader
from agents.runs.spool import UNSAFE, OutcomeSpool, attempt_from
from scheduling.backlog import backlog_add, backlog_fields
from scheduling.concurrency import slot_acquire, slot_wait

logger = logging.getLogger(__name__)


def _raise_soft_limit(signum, frame) -> None:
    raise SoftTimeLimitExceeded()


@contextmanager
def soft_time_limit(seconds: float) -> Iterator[None]:
    """Within this block, SoftTimeLimitExceeded is raised in the agent after `seconds` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_soft_limit)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.lru_cache(maxsize=128)
def _claim_sql(count: int) -> str:
    quote = connection.ops.quote_name
    runs, agents = quote(Run._meta.db_table), quote(Agent._meta.db_table)
    columns = _claimed_runs().columns(runs)
    agent = f"(SELECT {{}} FROM {agents} WHERE {agents}.id = {runs}.agent_id)"
    return f"""
        UPDATE {runs} SET status = %s, worker = %s, started_at = %s, lease_expires_at = %s,
            attempts = attempts + 1,
            -- A run taken back from a worker that died: the loss is the worker's, not the agent's.
            lost_attempts = CASE WHEN status = %s THEN lost_attempts + 1 ELSE lost_attempts END
        WHERE id IN ({", ".join(["%s"] * count)}) AND follows_id IS NULL AND (
            (status = %s AND (expires_at IS NULL OR expires_at >= %s))
            OR (status = %s AND lease_expires_at < %s AND lost_attempts < %s)
            OR (status = %s AND wake_at <= %s))
        RETURNING {columns}, {agent.format("name")} AS agent_name, {agent.format("cache_ttl")} AS agent_cache_ttl,
            {agent.format("concurrency_limit")} AS agent_concurrency_limit
    """


def runs_claim(*, run_ids: Sequence[str], worker: str) -> list[Run]:
    """Take the claimable runs among `run_ids` in one statement, in the message's order."""
    now, lease = timezone.now(), lease_until()
    ids = [Run._meta.pk.get_db_prep_value(run_id, connection) for run_id in run_ids]
    at = connection.ops.adapt_datetimefield_value
    params = [
        RunStatus.RUNNING,
        worker,
        at(now),
        at(lease),
        RunStatus.RUNNING,
        *ids,
        RunStatus.QUEUED,
        at(now),
        RunStatus.RUNNING,
        at(now),
        settings.RUN_LOST_ATTEMPTS_MAX,
        RunStatus.WAITING,
        at(now),
    ]
    with connection.cursor() as cursor:
        cursor.execute(_claim_sql(len(ids)), params)
        rows = cursor.fetchall()
    # Built from the rows as the ORM would (converters included), without a RawQuerySet's per-query work.
    reader = _claimed_runs()
    claimed = {}
    for row in rows:
        run = reader.read(row)
        agent_name, cache_ttl, concurrency_limit = row[len(reader) :]
        run.agent = Agent(id=run.agent_id, name=agent_name, cache_ttl=cache_ttl, concurrency_limit=concurrency_limit)
        claimed[run.pk] = run
    return [claimed[run_id] for run_id in run_ids if run_id in claimed]


@functools.cache
def _claimed_runs() -> RowReader:
    # The payloads of earlier attempts (result, error) are not needed to run the next one.
    return RowReader(Run, [field for field in Run._meta.concrete_fields if field.name not in ("result", "error")])


def _received(run_ids: Sequence[str], claimed: Sequence[Run]) -> None:
    """One round trip: the messages' markers go, the claimed runs leave the backlog and announce their start."""
    pipe = redis_client().pipeline(transaction=False)
    messages_received(pipe, run_ids)
    backlog_add(pipe, _backlog_change(claimed, -1))
    events.publish_run_events((events.event_of_run(run, "started") for run in claimed), pipe=pipe)


_announcer: tuple[int, ThreadPoolExecutor] | None = None


def _in_background(call: Callable[[], None]) -> Future:
    """Run `call` on this process's one background thread, so that the agents need not wait for it.

    Used for the round trip that follows a claim: the first agent of the message starts at once, and
    the message's outcomes are recorded only once it is done, so that a run's start is announced
    before its end.
    """
    global _announcer
    if _announcer is None or _announcer[0] != os.getpid():
        # A forked process inherits no running thread: it starts its own.
        _announcer = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-announcer"))
    return _announcer[1].submit(call)


def _done(future: Future) -> None:
    """Wait for background work: what it failed at is logged, never raised into the runs' outcomes."""
    try:
        future.result()
    except Exception:
        logger.exception("announcing the start of a message's runs failed")


def _backlog_change(runs: Sequence[Run], each: int) -> Counter[str]:
    change: Counter[str] = Counter()
    for run in runs:
        for field in backlog_fields(tier=run.tier, agent=run.agent.name, user=run.submitted_by_id):
            change[field] += each
    return change


T = TypeVar("T")


def until_database_answers(write: Callable[[], T], *, what: str) -> T:
    """Call `write` until the database answers it, waiting longer between tries up to RUN_WRITE_RETRY_MAX_SECONDS.

    A worker cannot do anything useful for its runs without the database, and giving up on the write
    that records an agent's outcome would have the run executed again once its lease lapses.
    """
    delay = 0.05
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            logger.warning("%s: the database did not answer (%s); trying again in %.2fs", what, exc, delay)
        # Hands a broken connection back; the next query opens a new one.
        with contextlib.suppress(DatabaseError):
            connection.close()
        time.sleep(delay)
        delay = min(delay * 2, settings.RUN_WRITE_RETRY_MAX_SECONDS)


def runs_execute(*, run_ids: Sequence[str], worker: str) -> None:
    """Run one attempt of each run of a message that this delivery wins the claim of."""
    began = time.monotonic()
    run_ids = _valid_ids(run_ids)
    claimed = _claim_once_stored(run_ids, worker=worker)
    if not claimed:
        _received([str(run_id) for run_id in run_ids], claimed)
        _not_claimed(run_ids, worker=worker)
        return
    board.hold([run.pk for run in claimed])
    spool = OutcomeSpool.of_this_process(worker)
    spool.begin(claimed_at=claimed[0].started_at)
    try:
        _execute_claimed(claimed, run_ids=run_ids, worker=worker, began=began, spool=spool)
    finally:
        board.hold(())
        spool.clear()


def _claim_once_stored(run_ids: list[uuid.UUID], *, worker: str) -> list[Run]:
    """Claim the message's runs; a lone run's message may come before its row is committed (it was sent
    while the row was inserted, see MessageAhead): with no row yet, wait for it up to
    RUN_MESSAGE_AHEAD_WAIT_SECONDS, then claim again."""

    def claim() -> list[Run]:
        return until_database_answers(lambda: runs_claim(run_ids=run_ids, worker=worker), what="claim")

    claimed = claim()
    if claimed or len(run_ids) != 1:
        return claimed
    stored = Run.objects.filter(pk__in=run_ids)
    deadline, delay = time.monotonic() + settings.RUN_MESSAGE_AHEAD_WAIT_SECONDS, 0.0005
    while not until_database_answers(stored.exists, what="looking for a run not yet stored"):
        if time.monotonic() >= deadline:
            logger.warning("dropping a message for run %s, which was not stored in time", run_ids[0])
            return []
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    # Committed since the first claim, or taken before it (a duplicate delivery): the claim tells which.
    return claim()


def _execute_claimed(
    claimed: list[Run], *, run_ids: list[uuid.UUID], worker: str, began: float, spool: OutcomeSpool
) -> None:
    # The claim is known by its start: heartbeats move the lease, a later claim has a later start.
    held = Q(status=RunStatus.RUNNING, worker=worker, started_at=claimed[0].started_at)
    if len(claimed) < len(run_ids):
        taken = {run.pk for run in claimed}
        _not_claimed([run_id for run_id in run_ids if run_id not in taken], worker=worker)
    claimed = _with_slots(claimed, held=held)
    received = _in_background(functools.partial(_received, [str(run_id) for run_id in run_ids], claimed))
    attempts: list[Attempt] = []
    try:
        for index, run in enumerate(claimed):
            if index and time.monotonic() - began > settings.RUN_MESSAGE_SLICE_SECONDS:
                _done(received)
                # Left claimed, they would wait out their lease before any other process could take them.
                hand_back = functools.partial(runs_hand_back, claimed[index:], held=held)
                until_database_answers(hand_back, what="handing runs back")
                break
            attempt = _attempt(run, worker)
            if attempt is not None:
                spool.add(attempt)
                attempts.append(attempt)
    finally:
        _done(received)
        _attempts_write(attempts, held=held)


def _attempts_write(attempts: Sequence[Attempt], *, held: Q) -> None:
    """Record how a message's attempts ended (retrying until the database answers): outcomes, then waits."""
    ended = [attempt for attempt in attempts if attempt.delegation is None]
    until_database_answers(lambda: attempts_record(ended, held=held), what="recording outcomes")
    for attempt in attempts:
        if attempt.delegation is not None:
            until_database_answers(lambda a=attempt: run_delegate(attempt=a, held=held), what="delegating")


def _valid_ids(run_ids: Sequence[str | uuid.UUID]) -> list[uuid.UUID]:
    valid = []
    for run_id in run_ids:
        try:
            valid.append(uuid.UUID(str(run_id)))
        except ValueError:
            logger.warning("dropping a message for %r, which is not a run id", run_id)
    return valid


def _not_claimed(run_ids: list[uuid.UUID], *, worker: str) -> None:
    """Of the runs a delivery could not claim, end those past their expiry or out of lost attempts."""
    now = timezone.now()
    overdue = Q(status=RunStatus.QUEUED, expires_at__lt=now) | Q(status=RunStatus.RUNNING, lease_expires_at__lt=now)
    stuck = list(Run.objects.select_related("agent").filter(overdue, pk__in=run_ids, follows__isnull=True))
    runs_expire(run for run in stuck if run.status == RunStatus.QUEUED)
    for run in stuck:
        if run.status == RunStatus.RUNNING:
            worker_lost(run)
    logger.info("%d runs of a message not claimed by %s: taken, cancelled or finished", len(run_ids), worker)


def _with_slots(claimed: list[Run], *, held: Q) -> list[Run]:
    """The claimed runs that may start: a run of an agent at its concurrency limit waits for a slot, queued."""
    waiting = []
    for run in claimed:
        limit = run.agent.concurrency_limit
        if not limit:
            continue
        # The slot outlives any attempt that keeps to its time limit; a killed worker's slot frees itself.
        lease = run.time_limit + settings.RUN_LEASE_SECONDS
        if not slot_acquire(agent=run.agent.name, run_id=str(run.pk), limit=limit, lease_seconds=lease):
            slot_wait(agent=run.agent.name, run_id=str(run.pk))
            waiting.append(run)
    if not waiting:
        return claimed
    until_database_answers(lambda: _release(waiting, held=held), what="queueing runs to wait for a slot")
    for run in waiting:
        logger.info("run %s waits for a slot of %s (limit %s)", run.pk, run.agent.name, run.agent.concurrency_limit)
    return [run for run in claimed if run not in waiting]


def _release(runs: Sequence[Run], *, held: Q) -> int:
    """Undo the claim of runs that did not start: queued again, the attempt not counted."""
    return Run.objects.filter(held, pk__in=[run.pk for run in runs]).update(
        status=RunStatus.QUEUED, worker="", started_at=None, lease_expires_at=None, attempts=F("attempts") - 1
    )


def runs_hand_back(runs: Sequence[Run], *, held: Q) -> None:
    """Give runs claimed but not started back to the queue, in two messages that other processes can take."""
    if not _release(runs, held=held):
        return
    for run in runs:
        run.status, run.attempts = RunStatus.QUEUED, run.attempts - 1
    pipe = redis_client().pipeline(transaction=False)
    backlog_add(pipe, _backlog_change(runs, +1))
    events.publish_run_events((events.event_of_run(run, "queued") for run in runs), pipe=pipe)
    run_dispatch(runs, per_message=max(1, (len(runs) + 1) // 2))


def _attempt(run: Run, worker: str) -> Attempt | None:
    """Call the run's agent; None when the run was cancelled meanwhile (the cancellation recorded it)."""
    spec = registry.get(run.agent.name)
    started_at, started = timezone.now(), time.monotonic()
    board.executing_now(run.pk, deadline=time.time() + run.time_limit)
    context: RunContext | None = None
    try:
        if spec is None:
            raise AgentNotRegistered(f"agent {run.agent.name!r} is not declared in code on {worker}")
        with cancel_watch.watching(str(run.pk)), soft_time_limit(run.soft_time_limit):
            context, parsed = RunContext(run), spec.parse_input(run.input)
            if run.resume:
                output = resumed(run, call=lambda then, wake: then(context, parsed, wake))
            else:
                output = spec.func(context, parsed)
            if isinstance(output, Delegation):
                return Attempt(
                    run=run, started_at=started_at, finished_at=timezone.now(), run_ms=_ms_since(started),
                    delegation=output, log=context.log,
                )  # fmt: skip
            result = _jsonable(output)
    except RunCancelled:
        logger.info("run %s cancelled while running", run.pk)
        slots_free(run)
        return None
    except Exception as exc:
        return Attempt(
            run=run, started_at=started_at, finished_at=timezone.now(), run_ms=_ms_since(started),
            error=error_record(exc), retryable=not isinstance(exc, AgentNotRegistered | ChildFailed),
            log=context and context.log,
        )  # fmt: skip
    finally:
        board.executing_now(None)
    return Attempt(
        run=run, started_at=started_at, finished_at=timezone.now(), run_ms=_ms_since(started), result=result,
        log=context.log,
    )  # fmt: skip


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _jsonable(output: Any) -> Any:
    if isinstance(output, BaseModel):
        return output.model_dump(mode="json")
    # Fails here, as the agent's error, rather than later when the row is written.
    return json.loads(json.dumps(output))


def error_record(exc: BaseException) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def message_killed(*, run_ids: Sequence[str], worker: str, pid: int | None, limit: float) -> None:
    """Celery killed a process at its message's hard time limit (the watchdog's backstop): record what it had
    finished, fail the attempt it was executing, hand back the rest of the message (the message is
    acknowledged, so they need a new one)."""
    claimed_at = _spooled_record(worker=worker, pid=pid)
    culprit, others = _message_held(run_ids, worker=worker, pid=pid, claimed_at=claimed_at)
    if culprit is not None:
        _time_limit_exceeded(culprit)
    if others:
        runs_hand_back(others, held=_claim(worker, claimed_at))
    if pid:
        board.forget(pid)
    logger.warning("message of %d runs killed at its hard limit of %gs on %s", len(run_ids), limit, worker)


def message_lost(*, run_ids: Sequence[str], worker: str, pid: int | None) -> None:
    """A pool process died mid-message (killed by the watchdog past a run's hard limit, or by anything else):
    what it had finished is recorded, the run it was executing fails for its time limit or goes back without
    spending a retry, and the others go back, for the redelivered message to claim at once."""
    claimed_at = _spooled_record(worker=worker, pid=pid)
    culprit, others = _message_held(run_ids, worker=worker, pid=pid, claimed_at=claimed_at)
    killed = culprit is not None and board.killed(pid)
    # Celery delivers the message again, for every run of it that goes back to the queue.
    going_back = [*others, culprit] if culprit is not None and not killed else others
    messages_restored([str(run.pk) for run in going_back])
    if killed:
        _time_limit_exceeded(culprit)
    elif culprit is not None:
        # The redelivered message claims the run, queued again without spending a retry.
        worker_lost(culprit, dispatch=False)
    if others:
        _release(others, held=_claim(worker, claimed_at))
    if pid:
        board.forget(pid)


def pool_process_died(pid: int, *, worker: str) -> None:
    """A pool process died holding runs and no failed message told of it: what it had finished is recorded,
    the run it was executing goes back without spending a retry (or fails, past its hard limit), and the
    others go back to the queue."""
    # The spool stays: a failed message may yet tell of the same process, and finds the claim in it.
    claimed_at = _spooled_record(worker=worker, pid=pid, clear=False)
    if claimed_at is not None:
        culprit, others = _message_held(board.held([pid]), worker=worker, pid=pid, claimed_at=claimed_at)
        if culprit is not None and board.killed(pid):
            _time_limit_exceeded(culprit)
        elif culprit is not None:
            worker_lost(culprit)
        if others:
            runs_hand_back(others, held=_claim(worker, claimed_at))
        held = len(others) + (culprit is not None)
        logger.warning("pool process %s of %s died holding %d runs; they are seen to", pid, worker, held)
    # Without a noted claim, the process died before its claim was known: the runs' leases lapse.
    board.forget(pid)


def _claim(worker: str, claimed_at: datetime | None) -> Q:
    """The runs `worker` holds, of the claim made at `claimed_at` if it is known (a claim is known by its start:
    another process of the same worker may have claimed some of them again since)."""
    held = Q(status=RunStatus.RUNNING, worker=worker)
    return held & Q(started_at=claimed_at) if claimed_at is not None else held


def _time_limit_exceeded(culprit: Run) -> None:
    error = {
        "type": "TimeLimitExceeded",
        "message": f"the agent ran past its hard time limit of {culprit.time_limit:g}s and was killed",
        "traceback": "",
    }
    run_ms = int((timezone.now() - culprit.started_at).total_seconds() * 1000) if culprit.started_at else None
    attempt_lost(culprit, error=error, run_ms=run_ms)
    slots_free(culprit)


def spooled_record_all(*, worker: str, live: Collection[int] = ()) -> None:
    """Record what the pool processes of `worker` had finished but not written, but for the `live` ones: for a
    worker whose pool stopped, or one starting where an earlier worker of its name died whole."""
    for path in Path(settings.RUN_SPOOL_DIR).glob(f"agentplatform-{UNSAFE.sub('_', worker)}-*.jsonl"):
        pid = path.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) not in live:
            try:
                _spooled_record(worker=worker, pid=int(pid))
            except DatabaseError as exc:
                logger.warning("could not record what process %s of %s had finished: %s", pid, worker, exc)


def _spooled_record(*, worker: str, pid: int | None, clear: bool = True) -> datetime | None:
    """Record the attempts a dead pool process had finished but not written, from its spool; returns the start
    of the claim the process held (None if its spool noted none)."""
    if not pid:
        return None
    spool = OutcomeSpool(worker=worker, pid=pid)
    claimed_at, entries = spool.read()
    if entries:
        held = _claim(worker, claimed_at)
        runs = Run.objects.select_related("agent").filter(held, pk__in=[entry["run"] for entry in entries])
        by_id = {str(run.pk): run for run in runs}
        attempts = [attempt_from(entry, by_id[entry["run"]]) for entry in entries if entry["run"] in by_id]
        _attempts_write(attempts, held=held)
        if attempts:
            logger.info("recorded %d outcomes that a dead process of %s had reached", len(attempts), worker)
    if clear:
        spool.clear()
    return claimed_at


def _message_held(
    run_ids: Sequence[str | uuid.UUID], *, worker: str, pid: int | None, claimed_at: datetime | None = None
) -> tuple[Run | None, list[Run]]:
    """The message's runs this worker still holds (of the claim made at `claimed_at`, if known): the one the
    process was executing, and the others."""
    executing = board.executing(pid)
    held = list(Run.objects.select_related("agent").filter(_claim(worker, claimed_at), pk__in=_valid_ids(run_ids)))
    culprit = next((run for run in held if run.pk == executing), None)
    if culprit is None and len(held) == 1 and executing is None:
        # A message of one run: that run was executing, whatever the board could tell.
        culprit = held[0]
    return culprit, [run for run in held if run is not culprit]
