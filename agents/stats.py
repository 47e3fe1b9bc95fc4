"""How runs are faring: counts by status, SLA compliance, latency percentiles and backlog, per tier and per agent.

Percentiles are PostgreSQL's `percentile_cont` (linear interpolation between the closest ranks), computed
in the database in one grouped query; on other databases (the SQLite quick start) the same figures are
computed in Python over the values.
"""

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TypedDict

from django.contrib.postgres.fields import ArrayField
from django.db import connections
from django.db.models import Aggregate, Count, FloatField, Q, QuerySet
from django.utils import timezone

from agents.models import Agent, Run, RunStatus
from scheduling.tiers import Tier

DEFAULT_WINDOW = timedelta(hours=1)
MAX_WINDOW = timedelta(days=7)
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WINDOW_PATTERN = re.compile(r"([0-9]+)([smhd])")
# The same, as the OpenAPI schema states it.
WINDOW_SCHEMA_PATTERN = r"^[0-9]+[smhd]$"
PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
LATENCY_FIELDS = ("queue_wait_ms", "run_ms")


class Percentiles(TypedDict):
    p50: float | None
    p95: float | None
    p99: float | None


class StatsBlock(TypedDict):
    runs: dict[str, int]
    sla_compliance: float | None
    queue_wait_ms: Percentiles
    run_ms: Percentiles
    backlog: int


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
    blocks = _grouped_stats(runs=runs, key="tier", since=(now or timezone.now()) - window)
    return {tier.value: blocks.get(tier.value) or _empty_block() for tier in Tier}


def agent_stats(
    *,
    runs: QuerySet[Run],
    window: timedelta = DEFAULT_WINDOW,
    now: datetime | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, StatsBlock]:
    """One block per agent named in `names`; by default every registered agent and any other that has runs."""
    blocks = _grouped_stats(runs=runs, key="agent__name", since=(now or timezone.now()) - window)
    if names is None:
        names = sorted(set(Agent.objects.filter(registered=True).values_list("name", flat=True)) | blocks.keys())
    return {name: blocks.get(name) or _empty_block() for name in names}


def _percentiles_in_database(db: str) -> bool:
    return connections[db].vendor == "postgresql"


def _grouped_stats(*, runs: QuerySet[Run], key: str, since: datetime) -> dict[str, StatsBlock]:
    """Blocks keyed by the value of `key`, from one grouped query (and, off PostgreSQL, one more for latencies).

    Only groups with runs in the window or queued now have a block.
    """
    in_window = Q(submitted_at__gte=since)
    finished = in_window & Q(finished_at__isnull=False)
    aggregates = {
        **{f"status_{status}": Count("pk", filter=in_window & Q(status=status)) for status in RunStatus.values},
        "sla_known": Count("pk", filter=in_window & Q(sla_met__isnull=False)),
        "sla_kept": Count("pk", filter=in_window & Q(sla_met=True)),
        "queued_now": Count("pk", filter=Q(status=RunStatus.QUEUED)),
    }
    in_database = _percentiles_in_database(runs.db)
    if in_database:
        aggregates |= {
            f"percentiles_{field}": PercentilesCont(field, fractions=PERCENTILES.values(), filter=finished)
            for field in LATENCY_FIELDS
        }
    rows = list(runs.filter(in_window | Q(status=RunStatus.QUEUED)).order_by().values(key).annotate(**aggregates))
    if in_database:
        latencies = {row[key]: {field: row[f"percentiles_{field}"] for field in LATENCY_FIELDS} for row in rows}
    else:
        latencies = _latency_percentiles_in_python(runs=runs.filter(finished), key=key)
    return {
        row[key]: {
            "runs": {status: row[f"status_{status}"] for status in RunStatus.values},
            "sla_compliance": round(100 * row["sla_kept"] / row["sla_known"], 2) if row["sla_known"] else None,
            **{field: _percentiles(latencies.get(row[key], {}).get(field)) for field in LATENCY_FIELDS},
            "backlog": row["queued_now"],
        }
        for row in rows
    }


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
        "sla_compliance": None,
        "queue_wait_ms": _percentiles(None),
        "run_ms": _percentiles(None),
        "backlog": 0,
    }
