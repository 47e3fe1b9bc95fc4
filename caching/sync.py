"""Keeping the MemoizedFunction table in step with the functions the code memoizes."""

import logging
from dataclasses import dataclass

from django.db import transaction

from caching.memoize import memo_functions
from caching.models import MemoizedFunction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoSyncReport:
    created: list[str]
    updated: list[str]
    unregistered: list[str]


@transaction.atomic
def memo_sync_registry() -> MemoSyncReport:
    """Create rows for new memoized functions, refresh their version, flag rows the code no longer declares.

    Only the functions of modules this process has imported count as declared: call it after the
    agent registry has imported the agents' modules.
    """
    rows = {row.name: row for row in MemoizedFunction.objects.select_for_update()}
    declared = memo_functions()
    created, updated = [], []
    for memoized in declared:
        row = rows.get(memoized.name)
        if row is None:
            MemoizedFunction.objects.create(name=memoized.name, version=memoized.version)
            created.append(memoized.name)
        elif row.version != memoized.version or not row.registered:
            row.version, row.registered = memoized.version, True
            row.save(update_fields=["version", "registered", "updated_at"])
            updated.append(memoized.name)
    names = {memoized.name for memoized in declared}
    gone = [name for name, row in rows.items() if name not in names and row.registered]
    MemoizedFunction.objects.filter(name__in=gone).update(registered=False)
    if created or updated or gone:
        logger.info("memoized functions synced: created %s, updated %s, unregistered %s", created, updated, gone)
    return MemoSyncReport(created=created, updated=updated, unregistered=gone)
