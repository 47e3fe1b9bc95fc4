import dataclasses
import sys
import threading
import time

import pytest
from celery.signals import worker_ready
from django.core.management import call_command
from pydantic import BaseModel

from agents.models import Agent
from agents.registry import AgentRegistry, RegistryError, agent, registry
from agents.sync import agent_sync_registry
from scheduling.tiers import DEFAULT_SLA_SECONDS, Tier


class Empty(BaseModel):
    pass


def test_the_registry_discovers_builtin_agents_and_settings_modules():
    names = {spec.name for spec in registry}

    assert {"echo", "sleep", "text_stats", "factorize"} <= names
    assert "test.flaky" in names  # from AGENT_MODULES


def test_a_declaration_takes_its_description_from_the_docstring():
    assert registry.get("sleep").description.startswith("Sleep for")


def test_the_sla_defaults_to_the_tier_default():
    spec = registry.get("factorize")

    assert spec.tier is Tier.BATCH
    assert spec.sla_seconds == DEFAULT_SLA_SECONDS[Tier.BATCH]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "Bad Name", "input": Empty},
        {"name": "ok", "input": dict},
        {"name": "ok", "input": Empty, "soft_time_limit": 10, "time_limit": 5},
        {"name": "ok", "input": Empty, "max_retries": -1},
        {"name": "ok", "input": Empty, "tier": "urgent"},
    ],
)
def test_invalid_declarations_are_refused(kwargs):
    with pytest.raises((RegistryError, ValueError)):
        agent(**kwargs)(lambda ctx, input: None)


def test_two_functions_cannot_share_a_name():
    local = AgentRegistry()
    echo = registry.get("echo")
    local.register(echo)

    with pytest.raises(RegistryError, match="declared twice"):
        local.register(dataclasses.replace(echo, func=registry.get("sleep").func))


def test_a_caller_during_discovery_waits_until_every_module_is_imported(tmp_path, monkeypatch, settings):
    (tmp_path / "slow_declarations.py").write_text("import time\ntime.sleep(0.5)\nLOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_declarations", raising=False)
    settings.AGENT_MODULES = ["slow_declarations"]
    local = AgentRegistry()
    first = threading.Thread(target=local.discover)
    first.start()
    time.sleep(0.1)

    local.discover()

    assert getattr(sys.modules["slow_declarations"], "LOADED", False)
    first.join()
    sys.modules.pop("slow_declarations")


def test_sync_creates_a_row_per_agent_with_the_code_defaults(db):
    Agent.objects.all().delete()

    report = agent_sync_registry()

    assert "echo" in report.created
    factorize = Agent.objects.get(name="factorize")
    spec = registry.get("factorize")
    assert (factorize.tier, factorize.cache_ttl, factorize.time_limit) == (spec.tier, spec.cache_ttl, spec.time_limit)
    assert factorize.input_schema == spec.input_schema


def test_sync_keeps_tunables_set_in_the_database(db):
    Agent.objects.filter(name="echo").update(tier=Tier.CRITICAL, sla_seconds=1.5, enabled=False)

    agent_sync_registry()

    echo = Agent.objects.get(name="echo")
    assert (echo.tier, echo.sla_seconds, echo.enabled) == (Tier.CRITICAL, 1.5, False)


def test_sync_refreshes_what_the_code_owns(db):
    Agent.objects.filter(name="echo").update(version="0", description="stale", input_schema={})

    agent_sync_registry()

    echo = Agent.objects.get(name="echo")
    assert echo.version == registry.get("echo").version
    assert echo.input_schema == registry.get("echo").input_schema


def test_sync_flags_rows_the_code_no_longer_declares(db):
    Agent.objects.create(name="retired", version="1", sla_seconds=1, soft_time_limit=1, time_limit=1)

    report = agent_sync_registry()

    assert report.unregistered == ["retired"]
    assert Agent.objects.get(name="retired").registered is False


def test_migrate_syncs_the_registry(db):
    Agent.objects.all().delete()

    call_command("migrate", verbosity=0)

    assert Agent.objects.filter(name="echo").exists()


def test_a_starting_worker_syncs_the_registry(db):
    Agent.objects.all().delete()

    worker_ready.send(sender=None)

    assert Agent.objects.filter(name="factorize").exists()
