"""Memoized calls made by agents on real Celery workers, one per tier."""

import time
import uuid

import pytest
from django.contrib.auth.models import Permission

from agentplatform.redis_client import redis_client, redis_key
from agents.models import Run
from caching.memoize import memo_stats
from tests.sample_agents import memo_square

pytestmark = pytest.mark.usefixtures("transactional_db", "workers")


def submit(api, agent: str, input: dict, **fields) -> str:
    response = api.post("/api/v1/runs/", {"agent": agent, "input": input, **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def wait(api, run_id: str, seconds: float = 20) -> dict:
    return api.get(f"/api/v1/runs/{run_id}/", {"wait": seconds}).json()


def test_two_workers_running_the_same_memoized_call_at_once_compute_it_once(api):
    api.user.user_permissions.add(Permission.objects.get(codename="submit_critical"))
    key = uuid.uuid4().hex
    run_ids = [submit(api, "test.memo", {"key": key, "n": 7}, tier=tier) for tier in ("critical", "standard")]

    runs = [wait(api, run_id) for run_id in run_ids]

    assert [run["status"] for run in runs] == ["succeeded", "succeeded"]
    assert runs[0]["result"] == runs[1]["result"] == {"square": 49}
    assert int(redis_client().get(redis_key("test", "memo", key))) == 1
    workers = {Run.objects.get(pk=run_id).worker.split("-")[0] for run_id in run_ids}
    assert workers == {"critical", "standard"}
    # Both calls missed (so they overlapped): one computed, the other waited for its value.
    deadline = time.monotonic() + 5
    while (stats := memo_stats([memo_square.name])[memo_square.name]).misses < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (stats.misses, stats.computations) == (2, 1)
