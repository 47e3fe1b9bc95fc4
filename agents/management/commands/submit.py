"""Submit runs of an agent from the terminal: one input, or a JSONL file of them, and optionally wait for them.

The runs go through the same service as the API (`run_submit_many`, as the caller `--user`, by default
the first active staff user), in batches of RUN_BATCH_MAX_ITEMS. A line that is not a JSON object, or
that the agent refuses, is reported with its number and left out; the other lines still go in, and
the command then exits non-zero. With `--wait`, a progress bar (on stderr) follows the runs until they
finish, then a summary gives their outcomes and their latency from submission to finish.
"""

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper

from agents.errors import RunRejected
from agents.models import Run, RunStatus
from agents.runs.submit import RunRequest, run_submit_many
from scheduling.admission import AdmissionRefused
from scheduling.tiers import Tier

WAIT_POLL_SECONDS = 0.5
# Ids per query while waiting: a long file's runs are read back in slices.
READ_SLICE = 1000
PROGRESS_WIDTH = 30


@dataclass
class Submission:
    """What a submission stored, and the lines it left out: (line number, why) for each bad one."""

    runs: list[Run] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)
    # Lines of batches that admission refused (429): the backlog was full.
    refused: int = 0


def command_user(username: str | None):
    """The user the runs are submitted as: `username`, or the first active staff user."""
    users = get_user_model().objects.filter(is_active=True)
    if username:
        user = users.filter(username=username).first()
        if user is None:
            raise CommandError(f"No active user {username!r}.")
        return user
    user = users.filter(is_staff=True).order_by("pk").first()
    if user is None:
        raise CommandError("No active staff user to submit as: create one, or name a user with --user.")
    return user


def errors_text(errors: Any, prefix: str = "") -> str:
    """A field-level error structure ({"input": {"n": ["…"]}}) as one line: `input.n: …`."""
    if isinstance(errors, dict):
        return "; ".join(errors_text(value, f"{prefix}{key}." if key != "non_field_errors" else prefix)
                         for key, value in errors.items())  # fmt: skip
    if isinstance(errors, list):
        return "; ".join(errors_text(item, prefix) for item in errors)
    return f"{prefix.rstrip('.')}: {errors}" if prefix else str(errors)


def lines_read(stream: IO[str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed input) for each line that is not blank; an input that is not JSON is a RunRejected."""
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except ValueError as exc:
            yield number, RunRejected({"input": [f"Not JSON: {exc}."]})


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _item_errors(exc: RunRejected, count: int) -> tuple[int, dict]:
    """(index of the refused item, its errors) from a refusal of `count` requests.

    A refusal of the batch as a whole, or of several items at once, is no one line's: CommandError.
    """
    if count == 1:
        return 0, exc.errors
    items = exc.errors.get("runs")
    if not isinstance(items, dict) or len(items) != 1:
        raise CommandError(errors_text(exc.errors)) from exc
    ((index, errors),) = items.items()
    return int(index), errors


def _stored(*, user, agent: str, tier: str | None, lines: Sequence[tuple[int, Any]]) -> list[Run]:
    requests = [RunRequest(agent=agent, input=data, tier=tier) for _, data in lines]
    return [run for run, _ in run_submit_many(user=user, requests=requests, as_caller=True)]


def batch_submit(*, user, agent: str, tier: str | None, lines: Sequence[tuple[int, Any]], into: Submission) -> None:
    """Submit numbered inputs as one batch, leaving out each line that is not JSON or that the agent refuses.

    A refusal names the first item it found wrong: the items before it passed every check, so they
    are submitted as they are and the rest is tried again without it. A problem that is no line's own
    (the agent, the tier) is a CommandError; AdmissionRefused is left to the caller.
    """
    pending = []
    for number, data in lines:
        if isinstance(data, RunRejected):
            into.bad.append((number, errors_text(data.errors)))
        else:
            pending.append((number, data))
    while pending:
        try:
            into.runs += _stored(user=user, agent=agent, tier=tier, lines=pending)
            return
        except RunRejected as exc:
            index, errors = _item_errors(exc, len(pending))
            if set(errors) - {"input"}:
                raise CommandError(errors_text(errors)) from exc
            into.bad.append((pending[index][0], errors_text(errors)))
            if index:
                into.runs += _stored(user=user, agent=agent, tier=tier, lines=pending[:index])
            pending = pending[index + 1 :]


def runs_finished(run_ids: Sequence[Any]) -> set[Any]:
    """The ids among `run_ids` whose runs have reached a final status."""
    done: set[Any] = set()
    for start in range(0, len(run_ids), READ_SLICE):
        ids = run_ids[start : start + READ_SLICE]
        done.update(
            Run.objects.filter(pk__in=ids, status__in=RunStatus.terminal()).values_list("pk", flat=True)
        )  # fmt: skip
    return done


def runs_count(count: int) -> str:
    return f"{count} run" if count == 1 else f"{count} runs"


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (share in 0..1) of sorted `values`."""
    return values[max(math.ceil(share * len(values)) - 1, 0)]


def runs_summary(run_ids: Sequence[Any]) -> str:
    """One line: outcomes of the runs (cached and coalesced among those that succeeded) and their latency."""
    statuses: Counter[str] = Counter()
    cached = coalesced = 0
    latencies: list[float] = []
    for start in range(0, len(run_ids), READ_SLICE):
        rows = Run.objects.filter(pk__in=run_ids[start : start + READ_SLICE]).values_list(
            "status", "cached", "follows_id", "submitted_at", "finished_at"
        )
        for status, was_cached, follows, submitted_at, finished_at in rows:
            statuses[status] += 1
            cached += was_cached
            coalesced += follows is not None
            if finished_at is not None:
                latencies.append((finished_at - submitted_at).total_seconds() * 1000)
    unfinished = sum(count for status, count in statuses.items() if status not in RunStatus.terminal())
    succeeded = statuses[RunStatus.SUCCEEDED]
    parts = [
        f"{runs_count(len(run_ids))}: {succeeded} succeeded ({cached} cached, {coalesced} coalesced)",
        *(f"{statuses[status]} {status}" for status in (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.EXPIRED)),
    ]
    if unfinished:
        parts.append(f"{unfinished} unfinished")
    text = ", ".join(parts)
    if latencies:
        latencies.sort()
        text += f"; latency p50 {percentile(latencies, 0.5):.0f} ms, p95 {percentile(latencies, 0.95):.0f} ms"
    return text


class Progress:
    """A plain-text progress bar: redrawn in place on a terminal, a line at most every second elsewhere."""

    def __init__(self, stream: OutputWrapper, total: int) -> None:
        self.stream, self.total = stream, total
        self.tty = stream.isatty()
        self.shown: tuple[int, float] = (-1, 0.0)

    def show(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        last_done, last_at = self.shown
        changed = done != last_done
        if self.tty:
            # Redrawn over itself; the last state stays on its line.
            if changed or final:
                self.stream.write(f"\r{self._bar(done)}", style_func=str, ending="\n" if final else "")
        elif changed and (final or now - last_at >= 1):
            self.stream.write(self._bar(done), style_func=str)
        else:
            return
        self.shown = (done, now)
        self.stream.flush()

    def _bar(self, done: int) -> str:
        filled = PROGRESS_WIDTH * done // max(self.total, 1)
        return f"[{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {done}/{self.total} finished"


def runs_wait(run_ids: Sequence[Any], *, timeout: float | None, progress: Progress) -> int:
    """Wait until every run has finished or `timeout` seconds have passed; returns how many are unfinished."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(run_ids)
    while True:
        done = runs_finished(pending)
        pending = [run_id for run_id in pending if run_id not in done]
        timed_out = deadline is not None and time.monotonic() >= deadline
        progress.show(len(run_ids) - len(pending), final=not pending or timed_out)
        if not pending or timed_out:
            return len(pending)
        time.sleep(WAIT_POLL_SECONDS)


class Command(BaseCommand):
    help = (
        "Submit runs of an agent: one --input, or a --file of JSON inputs one per line (- for stdin), in batches "
        "of RUN_BATCH_MAX_ITEMS. With --wait, follow them to the end and print a summary."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("agent", help="The agent's name.")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--input", help="One run's input, a JSON object.")
        source.add_argument("--file", help="A file of inputs, one JSON object per line (JSONL); - reads stdin.")
        parser.add_argument("--tier", choices=Tier.values, help="The tier (default: the agent's).")
        parser.add_argument("--user", help="Submit as this user (default: the first active staff user).")
        parser.add_argument("--wait", action="store_true", help="Wait for the runs to finish, then summarise.")
        parser.add_argument("--timeout", type=float, help="With --wait: give up after this many seconds.")

    def handle(self, *args: Any, agent: str, input: str | None, file: str | None, **options: Any) -> None:
        user = command_user(options["user"])
        timeout = options["timeout"]
        if timeout is not None and timeout <= 0:
            raise CommandError("--timeout must be more than 0 seconds.")
        submission = Submission()
        if input is not None:
            self._one(user=user, agent=agent, tier=options["tier"], text=input, into=submission)
            self.stdout.write(str(submission.runs[0].pk))
        else:
            self._file(user=user, agent=agent, tier=options["tier"], path=file, into=submission)
            self.stdout.write(f"Submitted {runs_count(len(submission.runs))} of {agent}.")
        runs = submission.runs
        unfinished = 0
        if options["wait"] and runs:
            ids = [run.pk for run in runs]
            unfinished = runs_wait(ids, timeout=timeout, progress=Progress(self.stderr, len(ids)))
            self.stdout.write(runs_summary(ids))
        left_out = len(submission.bad) + submission.refused
        if left_out:
            raise CommandError(
                f"{left_out} of {left_out + len(runs)} lines were not submitted (see above); "
                f"the other {len(runs)} runs were."
            )
        if unfinished:
            raise CommandError(f"{unfinished} of {len(runs)} runs had not finished after {timeout:g}s.")

    def _one(self, *, user, agent: str, tier: str | None, text: str, into: Submission) -> None:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"--input is not JSON: {exc}.") from exc
        try:
            batch_submit(user=user, agent=agent, tier=tier, lines=[(1, data)], into=into)
        except AdmissionRefused as exc:
            raise CommandError(f"Refused: {exc} Retry after {exc.retry_after}s.") from exc
        if into.bad:
            raise CommandError(into.bad[0][1])

    def _file(self, *, user, agent: str, tier: str | None, path: str, into: Submission) -> None:
        try:
            stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"--file: cannot read {path}: {exc.strerror}.") from exc
        with stream:
            for batch in batches(lines_read(stream), settings.RUN_BATCH_MAX_ITEMS):
                reported, stored = len(into.bad), len(into.runs)
                try:
                    batch_submit(user=user, agent=agent, tier=tier, lines=batch, into=into)
                except AdmissionRefused as exc:
                    left = len(batch) - (len(into.runs) - stored) - (len(into.bad) - reported)
                    into.refused += left
                    self.stderr.write(
                        f"lines {batch[0][0]}-{batch[-1][0]}: {left} refused: {exc} Retry after {exc.retry_after}s."
                    )
                for number, message in sorted(into.bad[reported:]):
                    self.stderr.write(f"line {number}: {message}")
