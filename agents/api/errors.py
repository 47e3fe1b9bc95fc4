"""Domain errors to HTTP responses, in one place."""

from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from agents.errors import RunNotCancellable, RunNotWaiting, RunRejected
from scheduling.admission import AdmissionRefused
from scheduling.rate import RateExceeded


def exception_handler(exc, context) -> Response | None:
    if isinstance(exc, RunRejected):
        return Response(exc.errors, status=exc.status_code)
    if isinstance(exc, AdmissionRefused | RateExceeded):
        return Response(
            {"detail": str(exc)},
            status=status.HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, RunNotCancellable):
        return Response({"detail": str(exc), "status": exc.status}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, RunNotWaiting):
        return Response(
            {"detail": str(exc), "status": exc.status, "waits_for": exc.waits_for}, status=status.HTTP_409_CONFLICT
        )
    return drf_exception_handler(exc, context)
