"""Keeping the Agent table in step with the agents the code declares."""

import logging
from dataclasses import dataclass

from django.db import transaction

from agents.models import Agent
from agents.registry import registry
from caching.sync import memo_sync_registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    created: list[str]
    updated: list[str]
    unregistered: list[str]


@transaction.atomic
def agent_sync_registry() -> SyncReport:
    """Create rows for new agents, refresh what code owns, flag rows the code no longer declares.

    Code owns name, version, description and input schema; the database owns the tunables,
    which start from the code's defaults and are never overwritten once an operator can edit them.
    """
    rows = {agent.name: agent for agent in Agent.objects.select_for_update()}
    created, updated = [], []
    for spec in registry:
        code_owned = {
            "version": spec.version,
            "description": spec.description,
            "input_schema": spec.input_schema,
            "registered": True,
        }
        row = rows.get(spec.name)
        if row is None:
            Agent.objects.create(
                name=spec.name,
                tier=spec.tier,
                sla_seconds=spec.sla_seconds,
                soft_time_limit=spec.soft_time_limit,
                time_limit=spec.time_limit,
                max_retries=spec.max_retries,
                cache_ttl=spec.cache_ttl,
                **code_owned,
            )
            created.append(spec.name)
        elif any(getattr(row, field) != value for field, value in code_owned.items()):
            for field, value in code_owned.items():
                setattr(row, field, value)
            row.save(update_fields=[*code_owned, "updated_at"])
            updated.append(spec.name)
    declared = {spec.name for spec in registry}
    gone = [name for name, row in rows.items() if name not in declared and row.registered]
    Agent.objects.filter(name__in=gone).update(registered=False)
    if created or updated or gone:
        logger.info("agent registry synced: created %s, updated %s, unregistered %s", created, updated, gone)
    return SyncReport(created=created, updated=updated, unregistered=gone)


def sync_on_migrate(**kwargs) -> None:
    agent_sync_registry()
    # After the agents: discovering them imports the modules that declare memoized functions.
    memo_sync_registry()


def sync_on_worker_ready(**kwargs) -> None:
    agent_sync_registry()
    memo_sync_registry()
