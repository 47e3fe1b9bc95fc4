"""How runs are faring: counts by status, SLA compliance, latency percentiles, throughput and backlog, per
tier and per agent, over a window and (for the dashboard's charts) in buckets of time; and admission refusals.

Executed runs are counted apart from those that shared another's work: a run answered from the result cache
(`cached`) or one that followed an identical run in flight (`follows`) never ran, so latency percentiles and
SLA compliance are over executed runs only, and the shared ones have counts of their own.

Percentiles are PostgreSQL's `percentile_cont` (linear interpolation between the closest ranks), computed
in the database in one grouped query; on other databases (the SQLite quick start) the same figures are
computed in Python over the values.
"""

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypedDict

import redis
from django.contrib.postgres.fields import ArrayField
from django.db import connections
from django.db.models import Aggregate, Count, FloatField, Func, IntegerField, Q, QuerySet
from django.utils import timezone

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Agent, Run, RunStatus
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = timedelta(hours=1)
MAX_WINDOW = timedelta(days=7)
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WINDOW_PATTERN = re.compile(r"([0-9]+)([smhd])")
# The same, as the OpenAPI schema states it.
WINDOW_SCHEMA_PATTERN = r"^[0-9]+[smhd]$"
PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
LATENCY_FIELDS = ("queue_wait_ms", "run_ms")
# Runs that executed (or were meant to): not answered from the result cache, not following another run.
EXECUTED = Q(cached=False, follows__isnull=True)
SHARED_KINDS = {"cached": Q(cached=True), "coalesced": Q(follows__isnull=False)}
# Admission refusals are counted per tier and minute, in one Redis hash per hour, kept a little over a day.
REFUSALS_BUCKET_SECONDS = 60
REFUSALS_KEPT_SECONDS = 25 * 3600


class Percentiles(TypedDict):
    p50: float | None
    p95: float | None
    p99: float | None


class StatsBlock(TypedDict):
    runs: dict[str, int]
    executed: int
    cached: int
    coalesced: int
    sla_compliance: float | None
    queue_wait_ms: Percentiles
    run_ms: Percentiles
    finished_per_minute: float
    backlog: int
    running_now: int


class TierSeries(TypedDict):
    finished_per_minute: list[float]
    executed: list[int]
    cached: list[int]
    coalesced: list[int]
    sla_compliance: list[float | None]
    queue_wait_ms: dict[str, list[float | None]]
    run_ms: dict[str, list[float | None]]


class Series(TypedDict):
    bucket_seconds: int
    starts: list[datetime]
    tiers: dict[str, TierSeries]


class RunStats(TypedDict):
    window_seconds: int
    generated_at: datetime
    tiers: dict[str, StatsBlock]
    agents: dict[str, StatsBlock]


class PercentilesCont(Aggregate):
    """`percentile_cont(ARRAY[...]) WITHIN GROUP (ORDER BY expression)`: several percentiles from one sort.

    PostgreSQL only; the result is an array in the order of `fractions`, or NULL for no (non-null) values.
    """

    function = "percentile_cont"
    name = "PercentilesCont"
    template = "%(function)s(ARRAY[%(fractions)s]::double precision[]) WITHIN GROUP (ORDER BY %(expressions)s)"
    arity = 1
    output_field = ArrayField(FloatField())

    def __init__(self, expression, *, fractions: Iterable[float], filter: Q | None = None) -> None:
        fractions = [float(fraction) for fraction in fractions]
        # The fractions are written into the SQL, so only plain numbers in [0, 1] get there.
        if not fractions or not all(0.0 <= fraction <= 1.0 for fraction in fractions):
            raise ValueError(f"Percentile fractions must lie in [0, 1]; got {fractions!r}.")
        super().__init__(expression, filter=filter, fractions=", ".join(repr(fraction) for fraction in fractions))


class EpochBucket(Func):
    """The number of the `seconds`-long interval since the Unix epoch that a datetime falls in."""

    output_field = IntegerField()

    def __init__(self, expression, *, seconds: int) -> None:
        # Written into the SQL, so only a positive whole number gets there.
        self.seconds = int(seconds)
        if self.seconds <= 0:
            raise ValueError(f"A bucket must last at least a second; got {seconds!r}.")
        super().__init__(expression)

    def as_postgresql(self, compiler, connection, **extra):
        sql, params = compiler.compile(self.source_expressions[0])
        return f"FLOOR(EXTRACT(EPOCH FROM {sql}) / {self.seconds})::bigint", params

    def as_sqlite(self, compiler, connection, **extra):
        sql, params = compiler.compile(self.source_expressions[0])
        # '%%' is how a literal '%' survives the backend's placeholder conversion.
        return f"(CAST(strftime('%%s', {sql}) AS INTEGER) / {self.seconds})", params


def percentile_cont(values: Sequence[float], fraction: float) -> float | None:
    """The `fraction` percentile of `values` as PostgreSQL's percentile_cont computes it; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower, upper = math.floor(position), math.ceil(position)
    if lower == upper:
        return float(ordered[lower])
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def parse_window(text: str) -> timedelta:
    """`30s`, `15m`, `1h`, `1d` as a timedelta of at least a second and at most MAX_WINDOW; ValueError otherwise."""
    match = WINDOW_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a window; give a whole number and a unit: 30s, 15m, 1h or 1d.")
    # Compared as a number first: a timedelta of 10^20 seconds would overflow.
    number = match[1].lstrip("0")
    if len(number) > len(str(int(MAX_WINDOW.total_seconds()))):
        raise ValueError(f"The window must be at most {MAX_WINDOW.days}d.")
    seconds = int(number or 0) * WINDOW_UNITS[match[2]]
    if seconds <= 0:
        raise ValueError("The window must be at least 1s.")
    if seconds > MAX_WINDOW.total_seconds():
        raise ValueError(f"The window must be at most {MAX_WINDOW.days}d.")
    return timedelta(seconds=seconds)


def run_stats(*, runs: QuerySet[Run], window: timedelta = DEFAULT_WINDOW, now: datetime | None = None) -> RunStats:
    """Per tier and per agent figures over `runs` submitted within `window` before `now` (backlog: queued now)."""
    now = now or timezone.now()
    return {
        "window_seconds": int(window.total_seconds()),
        "generated_at": now,
        "tiers": tier_stats(runs=runs, window=window, now=now),
        "agents": agent_stats(runs=runs, window=window, now=now),
    }


def tier_stats(
    *, runs: QuerySet[Run], window: timedelta = DEFAULT_WINDOW, now: datetime | None = None
) -> dict[str, StatsBlock]:
    """One block for every tier, in tier order."""
    blocks = _grouped_stats(runs=runs, key="tier", since=(now or timezone.now()) - window, window=window)
    return {tier.value: blocks.get(tier.value) or _empty_block() for tier in Tier}


def agent_stats(
    *,
    runs: QuerySet[Run],
    window: timedelta = DEFAULT_WINDOW,
    now: datetime | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, StatsBlock]:
    """One block per agent named in `names`; by default every registered agent and any other that has runs."""
    blocks = _grouped_stats(runs=runs, key="agent__name", since=(now or timezone.now()) - window, window=window)
    if names is None:
        names = sorted(set(Agent.objects.filter(registered=True).values_list("name", flat=True)) | blocks.keys())
    return {name: blocks.get(name) or _empty_block() for name in names}


def _percentiles_in_database(db: str) -> bool:
    return connections[db].vendor == "postgresql"


def _grouped_stats(*, runs: QuerySet[Run], key: str, since: datetime, window: timedelta) -> dict[str, StatsBlock]:
    """Blocks keyed by the value of `key`, from one grouped query (and, off PostgreSQL, one more for latencies).

    Only groups with runs in the window, in flight now, or finished within the window have a block.
    """
    in_window = Q(submitted_at__gte=since)
    finished_in_window = Q(finished_at__gte=since)
    finished = in_window & Q(finished_at__isnull=False) & EXECUTED
    aggregates = {
        **{f"status_{status}": Count("pk", filter=in_window & Q(status=status)) for status in RunStatus.values},
        # Named apart from the model's fields: an annotation named `cached` would shadow the field in filters.
        "count_executed": Count("pk", filter=in_window & EXECUTED),
        **{f"count_{kind}": Count("pk", filter=in_window & shared) for kind, shared in SHARED_KINDS.items()},
        "sla_known": Count("pk", filter=in_window & EXECUTED & Q(sla_met__isnull=False)),
        "sla_kept": Count("pk", filter=in_window & EXECUTED & Q(sla_met=True)),
        "finished_in_window": Count("pk", filter=finished_in_window),
        "queued_now": Count("pk", filter=Q(status=RunStatus.QUEUED)),
        "running_now": Count("pk", filter=Q(status=RunStatus.RUNNING)),
    }
    in_database = _percentiles_in_database(runs.db)
    if in_database:
        aggregates |= {
            f"percentiles_{field}": PercentilesCont(field, fractions=PERCENTILES.values(), filter=finished)
            for field in LATENCY_FIELDS
        }
    in_flight = Q(status__in=[RunStatus.QUEUED, RunStatus.RUNNING])
    rows = list(runs.filter(in_window | in_flight | finished_in_window).order_by().values(key).annotate(**aggregates))
    if in_database:
        latencies = {row[key]: {field: row[f"percentiles_{field}"] for field in LATENCY_FIELDS} for row in rows}
    else:
        latencies = _latency_percentiles_in_python(runs=runs.filter(finished), key=key)
    minutes = window.total_seconds() / 60
    return {
        row[key]: {
            "runs": {status: row[f"status_{status}"] for status in RunStatus.values},
            "executed": row["count_executed"],
            "cached": row["count_cached"],
            "coalesced": row["count_coalesced"],
            "sla_compliance": _compliance(kept=row["sla_kept"], known=row["sla_known"]),
            **{field: _percentiles(latencies.get(row[key], {}).get(field)) for field in LATENCY_FIELDS},
            "finished_per_minute": round(row["finished_in_window"] / minutes, 3),
            "backlog": row["queued_now"],
            "running_now": row["running_now"],
        }
        for row in rows
    }


def _compliance(*, kept: int, known: int) -> float | None:
    return round(100 * kept / known, 2) if known else None


def _latency_percentiles_in_python(*, runs: QuerySet[Run], key: str) -> dict[str, dict[str, list[float | None]]]:
    values: dict[str, dict[str, list[int]]] = defaultdict(lambda: {field: [] for field in LATENCY_FIELDS})
    for group, *latencies in runs.order_by().values_list(key, *LATENCY_FIELDS):
        for field, value in zip(LATENCY_FIELDS, latencies, strict=True):
            if value is not None:
                values[group][field].append(value)
    return {
        group: {
            field: [percentile_cont(series, fraction) for fraction in PERCENTILES.values()] if series else None
            for field, series in fields.items()
        }
        for group, fields in values.items()
    }


def _percentiles(values: Sequence[float | None] | None) -> Percentiles:
    p50, p95, p99 = (None if value is None else round(value, 3) for value in values or [None] * len(PERCENTILES))
    return {"p50": p50, "p95": p95, "p99": p99}


def _empty_block() -> StatsBlock:
    return {
        "runs": dict.fromkeys(RunStatus.values, 0),
        "executed": 0,
        "cached": 0,
        "coalesced": 0,
        "sla_compliance": None,
        "queue_wait_ms": _percentiles(None),
        "run_ms": _percentiles(None),
        "finished_per_minute": 0.0,
        "backlog": 0,
        "running_now": 0,
    }


def bucket_starts(*, window: timedelta, bucket_seconds: int, now: datetime) -> list[datetime]:
    """The starts of the `bucket_seconds`-long buckets (aligned on the epoch) that cover `window` before `now`."""
    first = math.floor((now - window).timestamp() / bucket_seconds)
    last = math.floor(now.timestamp() / bucket_seconds)
    return [datetime.fromtimestamp(number * bucket_seconds, tz=UTC) for number in range(first, last + 1)]


def tier_series(*, runs: QuerySet[Run], window: timedelta, bucket_seconds: int, now: datetime | None = None) -> Series:
    """Per tier and per bucket of finishing time: runs finished per minute (executed, cached and coalesced
    apart), SLA compliance and latency percentiles of the executed ones. One grouped query on PostgreSQL.

    The last bucket is still filling: its rate is over the part of it that has passed.
    """
    now = now or timezone.now()
    starts = bucket_starts(window=window, bucket_seconds=bucket_seconds, now=now)
    first = round(starts[0].timestamp()) // bucket_seconds
    bucket = EpochBucket("finished_at", seconds=bucket_seconds)
    finished = runs.filter(finished_at__gte=starts[0], finished_at__lte=now).order_by()
    aggregates = {
        "finished": Count("pk"),
        "count_executed": Count("pk", filter=EXECUTED),
        **{f"count_{kind}": Count("pk", filter=shared) for kind, shared in SHARED_KINDS.items()},
        "sla_known": Count("pk", filter=EXECUTED & Q(sla_met__isnull=False)),
        "sla_kept": Count("pk", filter=EXECUTED & Q(sla_met=True)),
    }
    in_database = _percentiles_in_database(runs.db)
    if in_database:
        aggregates |= {
            f"percentiles_{field}": PercentilesCont(field, fractions=PERCENTILES.values(), filter=EXECUTED)
            for field in LATENCY_FIELDS
        }
    rows = {
        (row["tier"], row["bucket"] - first): row
        for row in finished.annotate(bucket=bucket).values("tier", "bucket").annotate(**aggregates)
    }
    if not in_database:
        for (tier, index), latencies in _bucket_percentiles_in_python(
            runs=finished.filter(EXECUTED), bucket_seconds=bucket_seconds, first=first
        ).items():
            if (tier, index) in rows:
                rows[tier, index] |= {f"percentiles_{field}": latencies.get(field) for field in LATENCY_FIELDS}
    # The minutes each bucket has lasted so far: whole ones, and the part of the last that has passed.
    minutes = [bucket_seconds / 60] * len(starts)
    minutes[-1] = max((now - starts[-1]).total_seconds(), 1) / 60
    tiers: dict[str, TierSeries] = {}
    for tier in Tier:
        found = [rows.get((tier.value, index)) for index in range(len(starts))]
        tiers[tier.value] = {
            "finished_per_minute": [
                round((row["finished"] if row else 0) / span, 3) for row, span in zip(found, minutes, strict=True)
            ],
            **{
                kind: [row[f"count_{kind}"] if row else 0 for row in found]
                for kind in ("executed", "cached", "coalesced")
            },
            "sla_compliance": [row and _compliance(kept=row["sla_kept"], known=row["sla_known"]) for row in found],
            **{
                field: _transposed([_percentiles(row.get(f"percentiles_{field}") if row else None) for row in found])
                for field in LATENCY_FIELDS
            },
        }
    return {"bucket_seconds": bucket_seconds, "starts": starts, "tiers": tiers}


def _transposed(points: list[Percentiles]) -> dict[str, list[float | None]]:
    return {name: [point[name] for point in points] for name in PERCENTILES}


def _bucket_percentiles_in_python(
    *, runs: QuerySet[Run], bucket_seconds: int, first: int
) -> dict[tuple[str, int], dict[str, list[float | None] | None]]:
    values: dict[tuple[str, int], dict[str, list[int]]] = defaultdict(lambda: {field: [] for field in LATENCY_FIELDS})
    for tier, finished_at, *latencies in runs.values_list("tier", "finished_at", *LATENCY_FIELDS):
        index = math.floor(finished_at.timestamp() / bucket_seconds) - first
        for field, value in zip(LATENCY_FIELDS, latencies, strict=True):
            if value is not None:
                values[tier, index][field].append(value)
    return {
        group: {
            field: [percentile_cont(series, fraction) for fraction in PERCENTILES.values()] if series else None
            for field, series in fields.items()
        }
        for group, fields in values.items()
    }


def admission_refusals_key(hour: int) -> str:
    """The hash of one hour's refusals (hours since the epoch): a field `<tier>:<minute since the epoch>` each."""
    return redis_key("admission", "refused", hour)


def admission_refusals_record(refused: Mapping[str, int], *, at: datetime | None = None) -> None:
    """Count runs refused admission, by tier, in the current minute. One round trip; Redis down counts nothing."""
    refused = {tier: count for tier, count in refused.items() if count}
    if not refused:
        return
    minute = math.floor((at or timezone.now()).timestamp() / REFUSALS_BUCKET_SECONDS)
    key = admission_refusals_key(minute * REFUSALS_BUCKET_SECONDS // 3600)
    pipe = redis_client().pipeline(transaction=False)
    for tier, count in refused.items():
        pipe.hincrby(key, f"{tier}:{minute}", count)
    pipe.expire(key, REFUSALS_KEPT_SECONDS)
    try:
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not count %d refused runs (%s)", sum(refused.values()), exc)


def admission_refusals(*, starts: Sequence[datetime], bucket_seconds: int, now: datetime) -> dict[str, list[int]]:
    """Runs refused admission per tier in each bucket starting at `starts` (buckets of whole minutes)."""
    first = math.floor(starts[0].timestamp() / REFUSALS_BUCKET_SECONDS) * REFUSALS_BUCKET_SECONDS
    hours = range(first // 3600, math.floor(now.timestamp()) // 3600 + 1)
    pipe = redis_client().pipeline(transaction=False)
    for hour in hours:
        pipe.hgetall(admission_refusals_key(hour))
    counts: dict[str, Counter[int]] = {tier.value: Counter() for tier in Tier}
    origin = round(starts[0].timestamp())
    for fields in pipe.execute():
        for field, count in fields.items():
            tier, _, minute = field.decode().partition(":")
            index = (int(minute) * REFUSALS_BUCKET_SECONDS - origin) // bucket_seconds
            if tier in counts and 0 <= index < len(starts):
                counts[tier][index] += int(count)
    return {tier: [counted[index] for index in range(len(starts))] for tier, counted in counts.items()}
