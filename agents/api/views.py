import functools

from django.conf import settings
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.api.parsers import BoundedJSONParser
from agents.api.schema import (
    BAD_QUERY,
    DETAIL,
    NOT_AUTHENTICATED,
    NOT_FOUND,
    RETRY_AFTER,
    SUBMIT_ERRORS,
)
from agents.api.serializers import (
    AgentSerializer,
    RunBatchSerializer,
    RunDetailSerializer,
    RunListQuerySerializer,
    RunSerializer,
    RunSignalSerializer,
    RunSubmitSerializer,
    RunTreeSerializer,
    RunWaitQuerySerializer,
    StatsQuerySerializer,
    StatsSerializer,
)
from agents.errors import PayloadTooLarge
from agents.models import Agent, Run
from agents.registry import AGENT_NAME_PATTERN
from agents.runs.cancellation import run_cancel
from agents.runs.delegation import run_signal
from agents.runs.selectors import run_list, run_tree, run_visible_to
from agents.runs.submit import run_submit_many
from agents.runs.waiting import run_submit_and_wait, run_wait
from agents.stats import run_stats
from scheduling.rate import Rate, RateCharge

# Room for the fields around a maximal input in a single submission.
ENVELOPE_BYTES = 16 * 1024


def refuse_oversized(request: Request, limit: int) -> None:
    """413 before the body is parsed, when its declared length is over the limit."""
    length = int(request.META.get("CONTENT_LENGTH") or 0)
    if length > limit:
        raise PayloadTooLarge({"detail": f"Request body is {length} bytes; the limit is {limit}."})


def visible_run(request: Request, run_id) -> Run:
    return get_object_or_404(run_visible_to(request.user), pk=run_id)


@extend_schema(responses={200: AgentSerializer(many=True), 401: NOT_AUTHENTICATED, 404: NOT_FOUND})
class AgentListView(generics.ListAPIView):
    """Agents that accept runs, with their tunables and input schema."""

    serializer_class = AgentSerializer
    queryset = Agent.objects.filter(registered=True).order_by("name")


@extend_schema(
    parameters=[
        OpenApiParameter(
            "name",
            str,
            OpenApiParameter.PATH,
            pattern=AGENT_NAME_PATTERN.pattern,
            examples=[OpenApiExample("echo", value="echo")],
        )
    ],
    responses={200: AgentSerializer, 401: NOT_AUTHENTICATED, 404: NOT_FOUND},
)
class AgentDetailView(generics.RetrieveAPIView):
    serializer_class = AgentSerializer
    queryset = Agent.objects.filter(registered=True)
    lookup_field = "name"

    def get_object(self) -> Agent:
        # Not a name an agent can have (a NUL would not even reach the database): no such agent.
        if not AGENT_NAME_PATTERN.match(self.kwargs["name"]):
            raise NotFound("No such agent.")
        return super().get_object()


class RunPagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 500


@functools.cache
def submit_rate(text: str) -> Rate:
    return Rate.parse(text)


def rate_charge(request: Request, runs: int) -> RateCharge:
    """Each run submitted counts against the user's submission rate (RateExceeded answers 429)."""
    return RateCharge(who=request.user.pk, runs=runs, rate=submit_rate(settings.API_SUBMIT_RATE))


class RunListCreateView(generics.ListAPIView):
    serializer_class = RunSerializer
    pagination_class = RunPagination
    parser_classes = [BoundedJSONParser]

    def get_queryset(self) -> QuerySet[Run]:
        query = RunListQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        return run_list(user=self.request.user, **query.validated_data)

    @extend_schema(
        parameters=[RunListQuerySerializer],
        responses={200: RunSerializer(many=True), 400: BAD_QUERY, 401: NOT_AUTHENTICATED, 404: NOT_FOUND},
    )
    def get(self, request: Request, *args, **kwargs) -> Response:
        """Your runs (all runs for staff), newest first."""
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=RunSubmitSerializer,
        parameters=[RETRY_AFTER, RunWaitQuerySerializer],
        examples=[
            OpenApiExample(
                "text_stats",
                value={"agent": "text_stats", "input": {"text": "Agents run. Workers work."}, "expires_in": 600},
                request_only=True,
            )
        ],
        responses={
            201: OpenApiResponse(
                RunSerializer,
                description="The run, queued (or answered from the result cache); with ?wait=N, as it stands once "
                "it has finished or N seconds have passed.",
            ),
            200: OpenApiResponse(RunSerializer, description="The run first submitted with this idempotency key."),
            **SUBMIT_ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        """Submit a run. A repeated idempotency_key answers 200 with the first run. With ?wait=N, answers as soon
        as the run has finished or N seconds have passed, in one request."""
        refuse_oversized(request, settings.RUN_MAX_INPUT_BYTES + ENVELOPE_BYTES)
        query = RunWaitQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        body = RunSubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        run, created = run_submit_and_wait(
            user=request.user,
            request=body.to_request(),
            timeout=query.validated_data["wait"],
            charge=rate_charge(request, 1),
        )
        return Response(RunSerializer(run).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class RunBatchView(APIView):
    parser_classes = [BoundedJSONParser]

    @extend_schema(
        request=RunBatchSerializer,
        parameters=[RETRY_AFTER],
        examples=[
            OpenApiExample(
                "two agents",
                value={"runs": [{"agent": "echo", "input": {"n": 1}}, {"agent": "factorize", "input": {"n": 91}}]},
                request_only=True,
            )
        ],
        responses={201: RunSerializer(many=True), **SUBMIT_ERRORS},
    )
    def post(self, request: Request) -> Response:
        """Submit up to RUN_BATCH_MAX_ITEMS runs in one transaction; one invalid item rejects them all."""
        refuse_oversized(request, settings.RUN_BATCH_MAX_BYTES)
        body = RunBatchSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        requests = body.to_requests()
        outcome = run_submit_many(
            user=request.user, requests=requests, as_caller=True, charge=rate_charge(request, len(requests))
        )
        return Response(RunSerializer([run for run, _ in outcome], many=True).data, status=status.HTTP_201_CREATED)


class RunDetailView(APIView):
    @extend_schema(
        parameters=[RunWaitQuerySerializer],
        responses={200: RunDetailSerializer, 400: BAD_QUERY, 401: NOT_AUTHENTICATED, 404: NOT_FOUND},
    )
    def get(self, request: Request, run_id) -> Response:
        """One run, with its children's count by status; with ?wait=N, answers as soon as it is finished or N
        seconds have passed."""
        query = RunWaitQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        try:
            run = run_wait(run_id=run_id, user=request.user, timeout=query.validated_data["wait"])
        except Run.DoesNotExist as exc:
            raise NotFound("No Run matches the given query.") from exc
        return Response(RunDetailSerializer(run).data)


class RunTreeView(APIView):
    @extend_schema(responses={200: RunTreeSerializer, 401: NOT_AUTHENTICATED, 404: NOT_FOUND})
    def get(self, request: Request, run_id) -> Response:
        """The run and every run below it: children, their children and so on, the run first."""
        tree = run_tree(run=visible_run(request, run_id), limit=settings.RUN_TREE_MAX_RUNS)
        return Response(RunTreeSerializer(tree).data)


class RunSignalView(APIView):
    parser_classes = [BoundedJSONParser]

    @extend_schema(
        request=RunSignalSerializer,
        responses={
            200: RunSerializer,
            400: BAD_QUERY,
            401: NOT_AUTHENTICATED,
            404: NOT_FOUND,
            409: OpenApiResponse(
                {
                    **DETAIL,
                    "properties": {
                        **DETAIL["properties"],
                        "status": {"type": "string"},
                        "waits_for": {"type": "string", "nullable": True},
                    },
                },
                description="The run waits for no such signal; `waits_for` names the one it waits for, if any.",
            ),
        },
    )
    def post(self, request: Request, run_id) -> Response:
        """Send a signal (a name and a JSON payload) to a run waiting for it; the run goes on with the payload."""
        body = RunSignalSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        run = run_signal(run=visible_run(request, run_id), **body.validated_data)
        return Response(RunSerializer(run).data)


class RunCancelView(APIView):
    @extend_schema(
        request=None,
        responses={
            200: RunSerializer,
            401: NOT_AUTHENTICATED,
            404: NOT_FOUND,
            409: OpenApiResponse(
                {**DETAIL, "properties": {**DETAIL["properties"], "status": {"type": "string"}}},
                description="The run already finished; `status` says how.",
            ),
        },
    )
    def post(self, request: Request, run_id) -> Response:
        """Cancel a queued or running run; 409 if it already finished."""
        run = run_cancel(run=visible_run(request, run_id))
        return Response(RunSerializer(run).data)


class StatsView(APIView):
    @extend_schema(
        parameters=[StatsQuerySerializer],
        responses={200: StatsSerializer, 400: BAD_QUERY, 401: NOT_AUTHENTICATED},
    )
    def get(self, request: Request) -> Response:
        """Per tier and per agent, over your runs (all runs for staff) submitted within the window:
        runs by status, executed apart from cached and coalesced, SLA compliance and queue-wait and
        run-time percentiles of executed runs, throughput (runs finished per minute), and the backlog
        queued and the runs running now."""
        query = StatsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        stats = run_stats(runs=run_visible_to(request.user), window=query.validated_data["window"])
        return Response(StatsSerializer(stats).data)
