from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agents.models import Agent, Run, RunStatus, SlaMiss
from agents.runs.delegation import SIGNAL_NAME_PATTERN
from agents.runs.selectors import run_children_by_status
from agents.runs.submit import MAX_EXPIRES_IN_SECONDS, RunRequest
from agents.stats import WINDOW_SCHEMA_PATTERN, parse_window
from scheduling.tiers import Tier


class KnownFieldsSerializer(serializers.Serializer):
    """A request body whose unknown fields answer 400 naming them, instead of being ignored.

    A misspelt optional field (`expire_in`) would otherwise be dropped silently, and the caller
    would never learn that the run does not expire.
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                known = ", ".join(self.fields)
                raise serializers.ValidationError(
                    {name: [f"Unknown field; the fields are {known}."] for name in unknown}
                )
        return super().to_internal_value(data)


@extend_schema_field(OpenApiTypes.OBJECT)
class JSONObjectField(serializers.JSONField):
    """A JSON object, taken as parsed: the service checks that it is one, that it can be stored, and
    what the agent's schema makes of it, naming the place of each problem."""

    def to_internal_value(self, data: Any) -> Any:
        # JSONField would encode the whole input once more only to answer "Value must be valid JSON.".
        return data


class AgentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Agent
        fields = [
            "name",
            "version",
            "description",
            "tier",
            "sla_seconds",
            "soft_time_limit",
            "time_limit",
            "max_retries",
            "cache_ttl",
            "enabled",
            "input_schema",
        ]


class RunSubmitSerializer(KnownFieldsSerializer):
    agent = serializers.CharField(max_length=100)
    input = JSONObjectField(
        help_text="A JSON object matching the agent's input_schema: no fields it does not declare, "
        f"nested at most {settings.RUN_INPUT_MAX_DEPTH} levels, no NUL characters."
    )
    tier = serializers.ChoiceField(
        choices=Tier.choices,
        required=False,
        help_text="Defaults to the agent's tier. critical needs the permission agents.submit_critical (staff have "
        "it); without it, a run of an agent whose tier is critical is placed on standard.",
    )
    idempotency_key = serializers.CharField(
        max_length=200,
        required=False,
        help_text="A repeat of the same request answers 200 with the first run; the same key with another agent, "
        "input or tier answers 409.",
    )
    deadline = serializers.DateTimeField(required=False, help_text="Finish by then; the agent's SLA if earlier.")
    expires_in = serializers.FloatField(
        required=False,
        min_value=0.001,
        max_value=MAX_EXPIRES_IN_SECONDS,
        help_text="Seconds after which a run that has not started ends expired (at most 30 days).",
    )
    expires_at = serializers.DateTimeField(required=False, help_text="A run not started by then ends expired.")
    cache = serializers.ChoiceField(
        choices=["use", "bypass"], required=False, default="use",
        help_text="use: answer at once from the result cache when it holds this input; bypass: always run.",
    )  # fmt: skip

    def to_request(self) -> RunRequest:
        return RunRequest(**self.validated_data)


class RunBatchSerializer(KnownFieldsSerializer):
    runs = RunSubmitSerializer(many=True, allow_empty=False, max_length=settings.RUN_BATCH_MAX_ITEMS)

    def to_internal_value(self, data: Any) -> Any:
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as exc:
            # Items' errors keyed by index, as the service names them ({"runs": {"3": {...}}}), not
            # a list holding an empty object for every valid item.
            runs = exc.detail.get("runs") if isinstance(exc.detail, dict) else None
            if isinstance(runs, list) and runs and all(isinstance(item, dict) for item in runs):
                exc.detail["runs"] = {str(index): errors for index, errors in enumerate(runs) if errors}
            raise

    def to_requests(self) -> list[RunRequest]:
        return [RunRequest(**item) for item in self.validated_data["runs"]]


class RunSerializer(serializers.ModelSerializer):
    agent = serializers.CharField(source="agent.name")
    parent = serializers.UUIDField(source="parent_id", allow_null=True)
    follows = serializers.UUIDField(source="follows_id", allow_null=True)
    sla_miss = serializers.ChoiceField(
        choices=[("", "None"), *SlaMiss.choices],
        help_text="For a missed SLA, the part that overran: queue_wait or run_time; empty otherwise.",
    )

    class Meta:
        model = Run
        fields = [
            "id",
            "agent",
            "agent_version",
            "tier",
            "status",
            "input",
            "result",
            "error",
            "attempts",
            "lost_attempts",
            "max_retries",
            "idempotency_key",
            "parent",
            "submitted_at",
            "started_at",
            "finished_at",
            "queue_wait_ms",
            "run_ms",
            "sla_seconds",
            "deadline",
            "sla_met",
            "sla_miss",
            "cached",
            "follows",
            "expires_at",
            "escalated_at",
        ]
        read_only_fields = fields

    def to_representation(self, run: Run) -> dict[str, Any]:
        # What ModelSerializer would give (a test holds the two equal), without building and
        # walking twenty-five field objects per run: a 1,000-run batch answers with 1,000 of these.
        return {
            "id": str(run.pk),
            "agent": run.agent.name,
            "agent_version": run.agent_version,
            "tier": str(run.tier),
            "status": str(run.status),
            "input": run.input,
            "result": run.result,
            "error": run.error,
            "attempts": run.attempts,
            "lost_attempts": run.lost_attempts,
            "max_retries": run.max_retries,
            "idempotency_key": run.idempotency_key,
            "parent": _text(run.parent_id),
            "submitted_at": _iso(run.submitted_at),
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "queue_wait_ms": run.queue_wait_ms,
            "run_ms": run.run_ms,
            "sla_seconds": float(run.sla_seconds),
            "deadline": _iso(run.deadline),
            "sla_met": run.sla_met,
            "sla_miss": str(run.sla_miss),
            "cached": run.cached,
            "follows": _text(run.follows_id),
            "expires_at": _iso(run.expires_at),
            "escalated_at": _iso(run.escalated_at),
        }


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _iso(value: datetime | None) -> str | None:
    """A datetime as DRF's DateTimeField writes it: ISO 8601 in the current time zone, UTC as Z."""
    if value is None:
        return None
    text = timezone.localtime(value).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class RunListQuerySerializer(serializers.Serializer):
    agent = serializers.CharField(required=False)
    status = serializers.ChoiceField(choices=RunStatus.choices, required=False)
    tier = serializers.ChoiceField(choices=Tier.choices, required=False)
    parent = serializers.UUIDField(required=False, help_text="Only the children of this run.")


class RunDetailSerializer(RunSerializer):
    """A run, and how many of its children stand at each status (for a run that delegated)."""

    children = serializers.DictField(
        child=serializers.IntegerField(), help_text="Its children's count by status; empty for a run with none."
    )

    class Meta(RunSerializer.Meta):
        fields = [*RunSerializer.Meta.fields, "children"]
        read_only_fields = fields

    def to_representation(self, run: Run) -> dict[str, Any]:
        return {**super().to_representation(run), "children": run_children_by_status(run)}


class RunSignalSerializer(KnownFieldsSerializer):
    name = serializers.RegexField(
        SIGNAL_NAME_PATTERN, max_length=100, help_text="The signal the run waits for (ctx.wait_for_signal)."
    )
    payload = serializers.JSONField(
        required=False, allow_null=True, default=None, help_text="Any JSON; the run's continuation receives it."
    )


class TreeRunSerializer(serializers.Serializer):
    """One run of a tree, as the tree view lists it."""

    id = serializers.UUIDField()
    parent = serializers.UUIDField(allow_null=True)
    agent = serializers.CharField()
    tier = serializers.ChoiceField(choices=Tier.choices)
    status = serializers.ChoiceField(choices=RunStatus.choices)
    submitted_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    queue_wait_ms = serializers.IntegerField(allow_null=True)
    run_ms = serializers.IntegerField(allow_null=True)
    cached = serializers.BooleanField()
    follows = serializers.UUIDField(allow_null=True)
    round = serializers.IntegerField(allow_null=True, help_text="The parent's round this child belongs to.")
    index = serializers.IntegerField(allow_null=True, help_text="Its place among the children of that round.")


class RunTreeSerializer(serializers.Serializer):
    root = serializers.UUIDField()
    count = serializers.IntegerField(help_text="Runs in the tree (the run asked for and its descendants).")
    truncated = serializers.BooleanField(help_text="True when the tree holds more runs than `runs` lists.")
    runs = TreeRunSerializer(many=True)


class RunWaitQuerySerializer(serializers.Serializer):
    wait = serializers.FloatField(
        required=False,
        default=0,
        min_value=0,
        max_value=settings.RUN_WAIT_MAX_SECONDS,
        help_text="Seconds to wait for the run to finish before answering.",
    )


class WindowField(serializers.RegexField):
    def get_value(self, dictionary: Mapping) -> Any:
        # DRF reads an empty query parameter as absent (the default); `?window=` is a mistake to name.
        if dictionary.get(self.field_name) == "":
            return ""
        return super().get_value(dictionary)


class StatsQuerySerializer(serializers.Serializer):
    window = WindowField(
        regex=WINDOW_SCHEMA_PATTERN,
        required=False,
        default="1h",
        trim_whitespace=False,
        error_messages={"invalid": "Give a whole number and a unit: 30s, 15m, 1h or 1d."},
        help_text="How far back to count runs by submission time: a whole number and a unit, "
        "e.g. 30s, 15m, 1h, 1d (at least 1s, at most 7d).",
    )

    def validate_window(self, value: str) -> timedelta:
        try:
            return parse_window(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc


class PercentilesSerializer(serializers.Serializer):
    p50 = serializers.FloatField(allow_null=True)
    p95 = serializers.FloatField(allow_null=True)
    p99 = serializers.FloatField(allow_null=True)


# One count per status a run can have, so that a new status shows in the stats and their schema at once.
RunCountsSerializer = type(
    "RunCountsSerializer",
    (serializers.Serializer,),
    {status: serializers.IntegerField() for status in RunStatus.values},
)


class StatsBlockSerializer(serializers.Serializer):
    runs = RunCountsSerializer(help_text="Runs submitted in the window, by status.")
    executed = serializers.IntegerField(
        help_text="Of those, runs that executed (or are to): neither answered from the result cache nor coalesced."
    )
    cached = serializers.IntegerField(help_text="Of those, runs answered from the result cache, without running.")
    coalesced = serializers.IntegerField(
        help_text="Of those, runs that followed an identical run in flight and shared its execution."
    )
    sla_compliance = serializers.FloatField(
        allow_null=True,
        help_text="Percent of the window's executed runs that finished and met their SLA; null when none finished.",
    )
    queue_wait_ms = PercentilesSerializer(
        help_text="Submission to first start, over the window's finished executed runs."
    )
    run_ms = PercentilesSerializer(help_text="Duration of the final attempt, over the window's finished executed runs.")
    finished_per_minute = serializers.FloatField(
        help_text="Throughput: runs that ended within the window (whenever submitted), per minute."
    )
    backlog = serializers.IntegerField(help_text="Runs queued now, whenever submitted.")
    running_now = serializers.IntegerField(help_text="Runs running now, whenever submitted.")


class TierStatsSerializer(serializers.Serializer):
    critical = StatsBlockSerializer()
    standard = StatsBlockSerializer()
    batch = StatsBlockSerializer()


class StatsSerializer(serializers.Serializer):
    window_seconds = serializers.IntegerField()
    generated_at = serializers.DateTimeField()
    tiers = TierStatsSerializer()
    agents = serializers.DictField(child=StatsBlockSerializer(), help_text="Keyed by agent name.")
