"""The operators' dashboard in the admin: a page of charts, the JSON it polls, and the workers online.

The page (`admin/agents/dashboard.html`, drawn by the vendored Chart.js and `agents/dashboard.js`) polls
`dashboard_snapshot` every few seconds (as each window says) and `workers_online` every
DASHBOARD_WORKERS_POLL_SECONDS: asking the workers is a broadcast that waits for their answers, so it is
polled apart and less often.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone

from agentplatform.celery import HOUSEKEEPING_QUEUE, app
from agents.models import Run
from agents.retention import retention_last_purge
from agents.stats import admission_refusals, tier_series, tier_stats
from caching.memoize import MemoStats, memo_stats
from caching.models import MemoizedFunction
from scheduling.tiers import Tier

logger = logging.getLogger(__name__)

# The windows an operator can choose, each with the length of its charts' buckets (whole minutes, the
# granularity of the admission refusal counters) and how often the page asks again: a day's figures
# cost more to compute and change more slowly.
DASHBOARD_WINDOWS: dict[str, tuple[timedelta, int, int]] = {
    "15m": (timedelta(minutes=15), 60, 5),
    "1h": (timedelta(hours=1), 60, 5),
    "24h": (timedelta(hours=24), 1800, 30),
}
DASHBOARD_DEFAULT_WINDOW = "1h"
DASHBOARD_WORKERS_POLL_SECONDS = 15
# How long the broadcast to the workers waits for their answers.
WORKER_INSPECT_TIMEOUT_SECONDS = 1.0
VIEW_PERMISSION = "agents.view_run"


def dashboard_snapshot(*, window: str, now: datetime | None = None) -> dict[str, Any]:
    """Every figure the dashboard shows over `window` (a key of DASHBOARD_WINDOWS), ready for JSON."""
    length, bucket_seconds, poll_seconds = DASHBOARD_WINDOWS[window]
    now = now or timezone.now()
    runs = Run.objects.all()
    blocks = tier_stats(runs=runs, window=length, now=now)
    series = tier_series(runs=runs, window=length, bucket_seconds=bucket_seconds, now=now)
    redis_answers = True
    try:
        refusals = admission_refusals(starts=series["starts"], bucket_seconds=bucket_seconds, now=now)
    except redis.RedisError:
        redis_answers = False
        refusals = {tier.value: [0] * len(series["starts"]) for tier in Tier}
    tiers = {
        tier: {**block, "admission_refusals": sum(refusals[tier]), "cache_hit_rate": _hit_rate(block)}
        for tier, block in blocks.items()
    }
    totals = {kind: sum(block[kind] for block in blocks.values()) for kind in ("executed", "cached", "coalesced")}
    memo = _memo_totals()
    return {
        "window": window,
        "window_seconds": int(length.total_seconds()),
        "bucket_seconds": bucket_seconds,
        "poll_seconds": poll_seconds,
        "generated_at": now,
        "redis_answers": redis_answers and memo is not None,
        "tiers": tiers,
        "series": {
            "starts": series["starts"],
            "tiers": {
                tier: {**figures, "admission_refusals": refusals[tier]} for tier, figures in series["tiers"].items()
            },
        },
        "cache": {**totals, "hit_rate": _hit_rate(totals), "memo": memo},
        "retention": {"days": settings.RUN_RETENTION_DAYS, "last_purge": retention_last_purge()},
    }


def _hit_rate(counts: dict[str, Any]) -> float | None:
    """Percent of the runs submitted that the result cache answered; None without runs."""
    submitted = counts["executed"] + counts["cached"] + counts["coalesced"]
    return round(100 * counts["cached"] / submitted, 2) if submitted else None


def _memo_totals() -> dict[str, Any] | None:
    """Memoized functions' counters summed (since they were first counted); None when Redis does not answer."""
    names = list(MemoizedFunction.objects.values_list("name", flat=True))
    try:
        stats = list(memo_stats(names).values()) if names else []
    except redis.RedisError:
        return None
    counters = ("local_hits", "redis_hits", "misses", "computations", "compute_ms", "saved_ms")
    total = MemoStats(**{counter: sum(getattr(one, counter) for one in stats) for counter in counters})
    return {
        "functions": len(names),
        "calls": total.calls,
        "hits": total.hits,
        "hit_rate": None if total.hit_rate is None else round(100 * total.hit_rate, 2),
        "saved_ms": round(total.saved_ms, 3),
    }


def workers_online(*, timeout: float = WORKER_INSPECT_TIMEOUT_SECONDS) -> dict[str, list[dict[str, Any]]]:
    """The workers that answer within `timeout`, by the queue they consume (tiers, then housekeeping, then
    `other`), each with its name and pool size. Two broadcasts, sent at once, so this takes about `timeout`.
    """

    def ask(method: str) -> dict[str, Any]:
        return getattr(app.control.inspect(timeout=timeout), method)() or {}

    with ThreadPoolExecutor(max_workers=2) as pool:
        asked = pool.submit(ask, "stats"), pool.submit(ask, "active_queues")
        stats, queues = (future.result() for future in asked)
    online: dict[str, list[dict[str, Any]]] = {name: [] for name in [*Tier.values, HOUSEKEEPING_QUEUE, "other"]}
    for name, figures in sorted(stats.items()):
        worker = {"name": name, "pool": (figures.get("pool") or {}).get("max-concurrency")}
        consumed = [queue["name"] for queue in queues.get(name) or []]
        for queue in [queue for queue in consumed if queue in online and queue != "other"] or ["other"]:
            online[queue].append(worker)
    return online


def _window_of(request: HttpRequest) -> str | None:
    window = request.GET.get("window", DASHBOARD_DEFAULT_WINDOW)
    return window if window in DASHBOARD_WINDOWS else None


def _check_permission(request: HttpRequest) -> None:
    # The admin lets in staff only; the dashboard also needs the right to see runs.
    if not request.user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied


def _window_error() -> JsonResponse:
    return JsonResponse({"window": [f"Choose one of {', '.join(DASHBOARD_WINDOWS)}."]}, status=400)


def dashboard_page(request: HttpRequest, *, admin_site: AdminSite) -> TemplateResponse:
    """The page: its charts and tables fill themselves from the JSON endpoints."""
    _check_permission(request)
    window = _window_of(request) or DASHBOARD_DEFAULT_WINDOW
    context = {
        **admin_site.each_context(request),
        "title": "Dashboard",
        "window": window,
        "windows": list(DASHBOARD_WINDOWS),
        "data_url": reverse("admin:agents_dashboard_data", current_app=admin_site.name),
        "workers_url": reverse("admin:agents_dashboard_workers", current_app=admin_site.name),
        "runs_url": reverse("admin:agents_run_changelist", current_app=admin_site.name),
        "workers_poll_seconds": DASHBOARD_WORKERS_POLL_SECONDS,
    }
    return TemplateResponse(request, "admin/agents/dashboard.html", context)


def dashboard_data(request: HttpRequest) -> JsonResponse:
    """The figures over `?window=` (15m, 1h or 24h; 1h by default); 400 naming the field for any other."""
    _check_permission(request)
    window = _window_of(request)
    if window is None:
        return _window_error()
    return JsonResponse(dashboard_snapshot(window=window))


def dashboard_workers(request: HttpRequest) -> JsonResponse:
    """The workers online by queue; 503 when the broker cannot be asked."""
    _check_permission(request)
    try:
        online = workers_online()
    except Exception as exc:
        logger.warning("could not ask the workers (%s)", exc)
        return JsonResponse({"detail": "The broker does not answer: the workers cannot be asked."}, status=503)
    return JsonResponse({"queues": online, "timeout_seconds": WORKER_INSPECT_TIMEOUT_SECONDS})
