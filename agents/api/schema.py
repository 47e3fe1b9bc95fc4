"""What the OpenAPI schema says beyond what drf-spectacular reads from the serializers: the error
answers of each endpoint, and request bodies exactly as strict as their validation."""

from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse

DETAIL = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
# Field names (or `detail`, or `runs` by item index) to messages, nested as the fields are.
FIELD_ERRORS = OpenApiTypes.OBJECT

BAD_REQUEST = OpenApiResponse(FIELD_ERRORS, description="The request is invalid; messages by field.")
BAD_QUERY = OpenApiResponse(FIELD_ERRORS, description="A query parameter is invalid; messages by parameter.")
NOT_AUTHENTICATED = OpenApiResponse(DETAIL, description="No credentials, or invalid ones.")
FORBIDDEN = OpenApiResponse(
    FIELD_ERRORS,
    description="The tier asked for needs a permission the caller lacks (critical: agents.submit_critical).",
)
NOT_FOUND = OpenApiResponse(DETAIL, description="No such object visible to the caller (or no such page).")
IDEMPOTENCY_CONFLICT = OpenApiResponse(
    FIELD_ERRORS,
    description="The idempotency key already names a run of another agent, input or tier; `run` names it.",
)
TOO_LARGE = OpenApiResponse(FIELD_ERRORS, description="The body or an input is over its size limit.")
REFUSED = OpenApiResponse(
    DETAIL,
    description="The tier, the agent or the caller's share of the tier is over its backlog limit, or the caller "
    "over their submission rate; come back after Retry-After seconds.",
)
RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    OpenApiTypes.INT,
    OpenApiParameter.HEADER,
    response=[429],
    description="Seconds to wait before submitting again.",
)

SUBMIT_ERRORS = {
    400: BAD_REQUEST,
    401: NOT_AUTHENTICATED,
    403: FORBIDDEN,
    409: IDEMPOTENCY_CONFLICT,
    413: TOO_LARGE,
    429: REFUSED,
}


def request_bodies_as_validated(result: dict[str, Any], generator, request, public) -> dict[str, Any]:
    """Postprocessing hook: submission bodies admit no unknown fields, and a batch holds 1 to RUN_BATCH_MAX_ITEMS runs.

    drf-spectacular leaves objects open and writes a list's bounds as string lengths.
    """
    schemas = result.get("components", {}).get("schemas", {})
    for name in ("RunSubmit", "RunBatch"):
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    runs = schemas.get("RunBatch", {}).get("properties", {}).get("runs")
    if runs is not None:
        runs.pop("minLength", None)
        runs.pop("maxLength", None)
        runs.update(minItems=1, maxItems=settings.RUN_BATCH_MAX_ITEMS)
    return result
