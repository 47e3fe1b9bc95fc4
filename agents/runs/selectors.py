"""Finding and listing runs."""

import functools
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import QuerySet

from agents.models import Agent, Run
from agents.runs.rows import RowReader


def run_visible_to(user) -> QuerySet[Run]:
    """The runs a user may see: their own, or all for staff."""
    runs = Run.objects.select_related("agent")
    return runs if user.is_staff else runs.filter(submitted_by=user)


def run_list(
    *, user, agent: str | None = None, status: str | None = None, tier: str | None = None, parent=None
) -> QuerySet[Run]:
    runs = run_visible_to(user)
    if parent:
        runs = runs.filter(parent_id=parent)
    if agent:
        runs = runs.filter(agent__name=agent)
    if status:
        runs = runs.filter(status=status)
    if tier:
        runs = runs.filter(tier=tier)
    return runs.order_by("-submitted_at")


def run_visible(*, run_id, user) -> Run:
    """The run, with its agent, if `user` may see it (Run.DoesNotExist otherwise), in one statement written
    once per process: the API reads one run far more often than anything else."""
    with connection.cursor() as cursor:
        cursor.execute(_visible_sql(), [_run_pk(run_id), bool(user.is_staff), user.pk])
        row = cursor.fetchone()
    if row is None:
        raise Run.DoesNotExist(f"no run {run_id} that this user may see")
    runs, agents = _run_rows()
    run = runs.read(row)
    run.agent = agents.read(row, start=len(runs))
    return run


def _run_pk(run_id) -> Any:
    """A run id as the database takes it in plain SQL (SQLite has no UUID type)."""
    return Run._meta.pk.get_db_prep_value(run_id, connection)


@functools.cache
def _run_rows() -> tuple[RowReader, RowReader]:
    return RowReader(Run, Run._meta.concrete_fields), RowReader(Agent, Agent._meta.concrete_fields)


@functools.cache
def _visible_sql() -> str:
    quote = connection.ops.quote_name
    runs, agents = _run_rows()
    return (
        f"SELECT {runs.columns('r')}, {agents.columns('a')} FROM {quote(Run._meta.db_table)} r "
        f"JOIN {quote(Agent._meta.db_table)} a ON a.{quote('id')} = r.{quote('agent_id')} "
        f"WHERE r.{quote('id')} = %s AND (%s OR r.{quote('submitted_by_id')} = %s)"
    )


def run_children_by_status(run: Run) -> dict[str, int]:
    """How many of the run's children stand at each status."""
    with connection.cursor() as cursor:
        cursor.execute(_children_by_status_sql(), [_run_pk(run.pk)])
        return dict(cursor.fetchall())


@functools.cache
def _children_by_status_sql() -> str:
    quote = connection.ops.quote_name
    return (
        f"SELECT {quote('status')}, COUNT(*) FROM {quote(Run._meta.db_table)} "
        f"WHERE {quote('parent_id')} = %s GROUP BY {quote('status')}"
    )


@dataclass(frozen=True)
class RunTree:
    root: Any
    count: int
    truncated: bool
    runs: list[dict[str, Any]]


TREE_FIELDS = {
    "id": "pk", "parent": "parent_id", "agent": "agent__name", "tier": "tier", "status": "status",
    "submitted_at": "submitted_at", "started_at": "started_at", "finished_at": "finished_at",
    "queue_wait_ms": "queue_wait_ms", "run_ms": "run_ms", "cached": "cached", "follows": "follows_id",
    "round": "parent_round", "index": "sibling_index",
}  # fmt: skip


def run_tree(*, run: Run, limit: int) -> RunTree:
    """The run and every run below it (children, their children, …), at most `limit` of them, top first."""
    if run.root is None and run.parent_id is None:
        # A run at the top of its tree: every run of the tree names it as root (one indexed read).
        below = Run.objects.filter(root=run.pk)
        count = below.count() + 1
        rows = list(below.order_by("submitted_at", "sibling_index").values(*TREE_FIELDS.values())[: limit - 1])
    else:
        rows, count, level = [], 0, [run.pk]
        while level:
            children = list(Run.objects.filter(parent_id__in=level).values(*TREE_FIELDS.values()))
            count += len(children)
            rows += children[: max(limit - 1 - len(rows), 0)]
            level = [child["pk"] for child in children]
        count += 1
    top = Run.objects.filter(pk=run.pk).values(*TREE_FIELDS.values())
    nodes = [{name: row[column] for name, column in TREE_FIELDS.items()} for row in [*top, *rows]]
    return RunTree(root=run.pk, count=count, truncated=count > len(nodes), runs=nodes)
