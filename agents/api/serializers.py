from django.conf import settings
from rest_framework import serializers

from agents.models import Agent, Run, RunStatus
from agents.runs import RunRequest
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

    def to_request(self) -> RunRequest:
        return RunRequest(**self.validated_data)


class RunBatchSerializer(serializers.Serializer):
    runs = RunSubmitSerializer(many=True, allow_empty=False, max_length=settings.RUN_BATCH_MAX_ITEMS)

    def to_requests(self) -> list[RunRequest]:
        return [RunRequest(**item) for item in self.validated_data["runs"]]


class RunSerializer(serializers.ModelSerializer):
    agent = serializers.CharField(source="agent.name")
    parent = serializers.UUIDField(source="parent_id", allow_null=True)

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
            "sla_met",
        ]
        read_only_fields = fields


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
