"""A run's JSON is written by hand for speed; it must stay what DRF's ModelSerializer would write."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework import serializers

from agents.api.serializers import RunSerializer
from agents.models import RunStatus, SlaMiss
from tests.factories import RunFactory


def as_drf_writes_it(run) -> dict:
    return serializers.ModelSerializer.to_representation(RunSerializer(), run)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"finished": True, "result": {"n": [1, 2]}, "idempotency_key": "k-1"},
        {"status": RunStatus.FAILED, "error": {"type": "ValueError", "message": "bad", "traceback": ""},
         "sla_met": False, "sla_miss": SlaMiss.RUN_TIME, "attempts": 3},
        {"cached": True, "status": RunStatus.SUCCEEDED, "result": None, "finished_at": timezone.now()},
        {"expires_at": timezone.now() + timedelta(minutes=5), "escalated_at": timezone.now()},
    ],
    ids=["queued", "succeeded", "failed", "cached", "expiring"],
)  # fmt: skip
def test_a_run_is_written_as_the_model_serializer_writes_it(db, fields):
    run = RunFactory(**fields)
    run.refresh_from_db()

    assert RunSerializer(run).data == as_drf_writes_it(run)


def test_a_child_that_follows_another_run_is_written_as_the_model_serializer_writes_it(db):
    parent = RunFactory()
    run = RunFactory(parent=parent, follows=parent)
    run.refresh_from_db()

    assert RunSerializer(run).data == as_drf_writes_it(run)
