from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import serializers

from agents.models import Agent, Run, RunStatus
from agents.runs.submit import RunRequest
from agents.stats import parse_window
from scheduling.tiers import Tier


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


class RunSubmitSerializer(serializers.Serializer):
    agent = serializers.CharField(max_length=100)
    input = serializers.JSONField(help_text="A JSON object matching the agent's input_schema.")
    tier = serializers.ChoiceField(choices=Tier.choices, required=False, help_text="Defaults to the agent's tier.")
    idempotency_key = serializers.CharField(max_length=200, required=False)
    deadline = serializers.DateTimeField(required=False, help_text="Finish by then; the agent's SLA if earlier.")
    expires_in = serializers.FloatField(
        required=False, min_value=0.001, help_text="Seconds after which a run that has not started ends expired."
    )
    expires_at = serializers.DateTimeField(required=False, help_text="A run not started by then ends expired.")
    cache = serializers.ChoiceField(
        choices=["use", "bypass"], required=False, default="use",
        help_text="use: answer at once from the result cache when it holds this input; bypass: always run.",
    )  # fmt: skip

    def to_request(self) -> RunRequest:
        return RunRequest(**self.validated_data)


class RunBatchSerializer(serializers.Serializer):
    runs = RunSubmitSerializer(many=True, allow_empty=False, max_length=settings.RUN_BATCH_MAX_ITEMS)

    def to_requests(self) -> list[RunRequest]:
        return [RunRequest(**item) for item in self.validated_data["runs"]]


class RunSerializer(serializers.ModelSerializer):
    agent = serializers.CharField(source="agent.name")
    parent = serializers.UUIDField(source="parent_id", allow_null=True)
    follows = serializers.UUIDField(source="follows_id", allow_null=True)

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


class RunWaitQuerySerializer(serializers.Serializer):
    wait = serializers.FloatField(
        required=False,
        default=0,
        min_value=0,
        max_value=settings.RUN_WAIT_MAX_SECONDS,
        help_text="Seconds to wait for the run to finish before answering.",
    )


class StatsQuerySerializer(serializers.Serializer):
    window = serializers.CharField(
        required=False,
        default="1h",
        help_text="How far back to count runs by submission time: a whole number and a unit, "
        "e.g. 30s, 15m, 1h, 1d (at most 7d).",
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


class RunCountsSerializer(serializers.Serializer):
    queued = serializers.IntegerField()
    running = serializers.IntegerField()
    succeeded = serializers.IntegerField()
    failed = serializers.IntegerField()
    cancelled = serializers.IntegerField()
    expired = serializers.IntegerField()


class StatsBlockSerializer(serializers.Serializer):
    runs = RunCountsSerializer(help_text="Runs submitted in the window, by status.")
    sla_compliance = serializers.FloatField(
        allow_null=True, help_text="Percent of the window's finished runs that met their SLA; null when none finished."
    )
    queue_wait_ms = PercentilesSerializer(help_text="Submission to first start, over the window's finished runs.")
    run_ms = PercentilesSerializer(help_text="Duration of the final attempt, over the window's finished runs.")
    backlog = serializers.IntegerField(help_text="Runs queued now, whenever submitted.")


class TierStatsSerializer(serializers.Serializer):
    critical = StatsBlockSerializer()
    standard = StatsBlockSerializer()
    batch = StatsBlockSerializer()


class StatsSerializer(serializers.Serializer):
    window_seconds = serializers.IntegerField()
    generated_at = serializers.DateTimeField()
    tiers = TierStatsSerializer()
    agents = serializers.DictField(child=StatsBlockSerializer(), help_text="Keyed by agent name.")
