"""Prometheus metrics: counted in every process of the platform, added up when `/metrics` is scraped.

prometheus-client's multiprocess mode: with `PROMETHEUS_MULTIPROC_DIR` set (`make up` sets it), each
process (gunicorn's workers, every Celery pool process, the housekeeping worker, the dispatcher)
writes its counts to files of its own in that directory, and a scrape adds up every file. Without it
a scrape sees the serving process alone. The directory must be emptied when the platform starts
(bin/up does): the files of an earlier start's processes would be counted again.

Recording costs a label lookup and a write to a memory-mapped file: no SQL and no Redis round trip,
so the hot path keeps its budget. The backlog is read from Redis when a scrape asks for it.

This module imports nothing of `agents` (runs are read by attribute), so that `caching` and
`scheduling` can count here without depending on the apps above them.
"""

import dataclasses
import logging
import os
import socket
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from celery.signals import worker_process_shutdown, worker_shutdown
from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, values
from prometheus_client import Counter as CounterMetric
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from agentplatform.redis_client import redis_client
from scheduling.backlog import backlog_key
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)


def process_file_id(pid: int) -> str:
    """How a process's files in the directory are named: the host's name and the pid (gunicorn_conf.py agrees)."""
    return f"{HOST}-{pid}"


# Processes of several containers may share the directory (one volume mounted in each), and
# their pids repeat from one container to the next: with the host's name, two never share a file.
HOST = socket.gethostname().replace("_", "-")
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: process_file_id(os.getpid()))

# From a critical run's milliseconds to a batch run's hours (seconds, Prometheus's base unit).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600,
)  # fmt: skip

RUNS_SUBMITTED = CounterMetric(
    "agentplatform_runs_submitted",
    "Runs accepted, by how they were taken in: queued to execute, answered from the result cache, or "
    "coalesced (following an identical run in flight).",
    ["agent", "tier", "outcome"],
)
RUNS_FINISHED = CounterMetric(
    "agentplatform_runs_finished",
    "Runs that reached a final status (succeeded, failed, cancelled, expired).",
    ["agent", "tier", "status"],
)
RUN_RETRIES = CounterMetric(
    "agentplatform_run_retries",
    "Failed attempts queued again while the agent had retries left.",
    ["agent", "tier"],
)
SLA_MISSED = CounterMetric(
    "agentplatform_sla_missed",
    "Runs that ended after their deadline, by the part that overran (queue_wait or run_time).",
    ["agent", "tier", "part"],
)
RUNS_REFUSED = CounterMetric(
    "agentplatform_runs_refused",
    "Runs refused at admission (429), by reason: tier_backlog, agent_backlog, user_share or batch_yield.",
    ["tier", "reason"],
)
RUNS_RATE_LIMITED = CounterMetric(
    "agentplatform_runs_rate_limited",
    "Runs refused because their submitter was over API_SUBMIT_RATE (429).",
)
RESULT_CACHE_LOOKUPS = CounterMetric(
    "agentplatform_result_cache_lookups",
    "Result cache lookups by result (hit or miss). Each hit answers a run; a run that executes is looked "
    "up twice, at submission and again as it takes the lead, in case a result was stored in between.",
    ["agent", "result"],
)
SWEEPER_ACTIONS = CounterMetric(
    "agentplatform_sweeper_actions",
    "Runs the sweeper acted on, by action: each count of its report (expired, requeued, failed, redispatched, "
    "escalated, woken, settled_followers, ...).",
    ["action"],
)
SWEEPER_PASSES = CounterMetric("agentplatform_sweeper_passes", "Passes of the sweeper that ran (not skipped).")
QUEUE_WAIT = Histogram(
    "agentplatform_run_queue_wait_seconds",
    "Submission to first start, of runs that executed, counted when they end.",
    ["tier"],
    buckets=DURATION_BUCKETS,
)
RUN_DURATION = Histogram(
    "agentplatform_run_duration_seconds",
    "Duration of each executed attempt, retried ones included.",
    ["tier"],
    buckets=DURATION_BUCKETS,
)

# The statuses that end an attempt the agent ran: its run_ms belongs to that attempt.
EXECUTED_STATUSES = frozenset({"succeeded", "failed", "queued"})

# Each metric's child per label values. prometheus-client's own lookup checks and converts the values
# on every call, which cost several times the count itself; the set of children is the same either way.
_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    child = _children.get((metric, labels))
    if child is None:
        child = _children[metric, labels] = metric.labels(*labels)
    return child


def _add(metric: Any, counts: Counter[tuple[str, ...]]) -> None:
    for labels, count in counts.items():
        _child(metric, *labels).inc(count)


def runs_submitted_record(runs: Iterable[Any]) -> None:
    """Count runs just stored by a submission; those answered from the cache also count as finished."""
    submitted: Counter[tuple[str, ...]] = Counter()
    finished: Counter[tuple[str, ...]] = Counter()
    for run in runs:
        agent, tier = run.agent.name, str(run.tier)
        if run.cached:
            submitted[agent, tier, "cached"] += 1
            finished[agent, tier, str(run.status)] += 1
        elif run.follows_id is not None:
            submitted[agent, tier, "coalesced"] += 1
        else:
            submitted[agent, tier, "queued"] += 1
    _add(RUNS_SUBMITTED, submitted)
    _add(RUNS_FINISHED, finished)


def runs_ended_record(runs: Iterable[Any]) -> None:
    """Count runs whose status change was just written: final statuses, retries, SLA misses and timings."""
    finished: Counter[tuple[str, ...]] = Counter()
    retried: Counter[tuple[str, ...]] = Counter()
    missed: Counter[tuple[str, ...]] = Counter()
    for run in runs:
        agent, tier, status = run.agent.name, str(run.tier), str(run.status)
        if run.is_terminal:
            finished[agent, tier, status] += 1
            if run.sla_met is False and run.sla_miss:
                missed[agent, tier, str(run.sla_miss)] += 1
            if run.queue_wait_ms is not None:
                _child(QUEUE_WAIT, tier).observe(run.queue_wait_ms / 1000)
        elif status == "queued":
            retried[agent, tier] += 1
        if run.run_ms is not None and status in EXECUTED_STATUSES and not run.cached:
            _child(RUN_DURATION, tier).observe(run.run_ms / 1000)
    _add(RUNS_FINISHED, finished)
    _add(RUN_RETRIES, retried)
    _add(SLA_MISSED, missed)


def runs_refused_record(runs: Sequence[Any], *, reason: str) -> None:
    """Count the runs of a submission that admission refused."""
    _add(RUNS_REFUSED, Counter((str(run.tier), reason) for run in runs))


def rate_refused_record(runs: int) -> None:
    """Count the runs of a submission refused for its submitter's rate."""
    RUNS_RATE_LIMITED.inc(runs)


def cache_lookups_record(agents: Sequence[str], hits: Sequence[object | None]) -> None:
    """Count result cache lookups: `hits[i]` is None for a miss of an entry of `agents[i]`."""
    lookups = Counter((agent, "miss" if hit is None else "hit") for agent, hit in zip(agents, hits, strict=True))
    _add(RESULT_CACHE_LOOKUPS, lookups)


def sweep_record(report: Any) -> None:
    """Count one sweeper pass and what it did (a SweepReport: one count per action)."""
    SWEEPER_PASSES.inc()
    for field in dataclasses.fields(report):
        if count := getattr(report, field.name):
            _child(SWEEPER_ACTIONS, field.name).inc(count)


class BacklogCollector(Collector):
    """Queued runs per tier and per agent, read from the backlog counters in Redis when scraped."""

    def collect(self) -> Iterator[Metric]:
        try:
            counters = redis_client().hgetall(backlog_key())
        except redis.RedisError as exc:
            # A scrape still answers with everything else; the gap in the series shows the outage.
            logger.warning("metrics: could not read the backlog from Redis (%s)", exc)
            return
        tiers = GaugeMetricFamily(
            "agentplatform_backlog_runs", "Queued runs per tier, as admission counts them.", labels=["tier"]
        )
        agents = GaugeMetricFamily(
            "agentplatform_agent_backlog_runs", "Queued runs per agent, as admission counts them.", labels=["agent"]
        )
        values = {field.decode(): int(value) for field, value in counters.items()}
        for tier in Tier:
            tiers.add_metric([tier.value], max(values.get(f"tier:{tier.value}", 0), 0))
        for field, value in sorted(values.items()):
            if field.startswith("agent:"):
                agents.add_metric([field.removeprefix("agent:")], max(value, 0))
        yield tiers
        yield agents


def metrics_exposition(*, accept: str | None = None) -> tuple[bytes, str]:
    """Every process's metrics added up, and the backlog: (body, content type) in the format `accept` asks for."""
    registry = CollectorRegistry()
    if settings.METRICS_MULTIPROC_DIR:
        MultiProcessCollector(registry, path=settings.METRICS_MULTIPROC_DIR)
    else:
        registry.register(REGISTRY)
    registry.register(BacklogCollector())
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


@worker_process_shutdown.connect
@worker_shutdown.connect
def _process_dead(**kwargs: Any) -> None:
    # prometheus-client's bookkeeping for a process that leaves: its live gauges must stop counting.
    if settings.METRICS_MULTIPROC_DIR:
        mark_process_dead(process_file_id(os.getpid()), path=settings.METRICS_MULTIPROC_DIR)
