"""The operators' endpoints: `/metrics` for Prometheus (behind a bearer token), `/healthz` and `/readyz` for probes."""

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from agentplatform.health import readiness_check
from agentplatform.metrics import metrics_exposition


def _bearer_token(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@require_GET
@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Every process's metrics in Prometheus's format, for `Authorization: Bearer <METRICS_TOKEN>` only."""
    expected = settings.METRICS_TOKEN
    if not expected:
        # No token chosen: nothing is served rather than everything to anyone.
        return JsonResponse({"detail": "Metrics are not served: METRICS_TOKEN is not set."}, status=404)
    given = _bearer_token(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        response = JsonResponse(
            {"detail": "Metrics need the header Authorization: Bearer <METRICS_TOKEN>."}, status=401
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    body, content_type = metrics_exposition(accept=request.headers.get("Accept"))
    return HttpResponse(body, content_type=content_type)


@require_GET
@never_cache
def healthz_view(request: HttpRequest) -> JsonResponse:
    """The process serves: nothing else is checked."""
    return JsonResponse({"status": "ok"})


@require_GET
@never_cache
def readyz_view(request: HttpRequest) -> JsonResponse:
    """200 when the database, Redis and a worker for every queue answer; 503 naming each check that failed."""
    readiness = readiness_check(timeout=settings.READY_TIMEOUT_SECONDS)
    body = {
        "status": "ok" if readiness.ready else "unavailable",
        "checks": readiness.checks,
        "failed": readiness.failed,
    }
    return JsonResponse(body, status=200 if readiness.ready else 503)
