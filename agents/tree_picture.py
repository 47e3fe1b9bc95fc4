"""A run's tree drawn for the admin's run page: an SVG of the run and every run below it, each node coloured
by its status and linked to its own page; for a workflow, the DAG of its steps, coloured by their runs.

Server-drawn (no script), laid out by depth: every run of a level in a row, under its parent's place.
A tree larger than TREE_PICTURE_MAX_RUNS is summarised by level instead of drawn run by run.
"""

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from django.utils.html import escape, format_html
from django.utils.safestring import SafeString, mark_safe

from agents.models import Run, RunStatus
from agents.runs.selectors import run_tree
from agents.workflows import WORKFLOWS, Workflow

TREE_PICTURE_MAX_RUNS = 400
COLOURS = {
    RunStatus.QUEUED: "#9ca3af",
    RunStatus.RUNNING: "#3b82f6",
    RunStatus.WAITING: "#a855f7",
    RunStatus.SUCCEEDED: "#22c55e",
    RunStatus.FAILED: "#ef4444",
    RunStatus.CANCELLED: "#f59e0b",
    RunStatus.EXPIRED: "#78716c",
}
NOT_STARTED = "#e5e7eb"
STEP, LEVEL, RADIUS, MARGIN = 26, 56, 8, 20


def run_tree_picture(run: Run, *, link: Callable[[Any], str]) -> SafeString | None:
    """The picture of `run`'s tree (None for a run with no children); `link(run_id)` is a run's admin page."""
    tree = run_tree(run=run, limit=TREE_PICTURE_MAX_RUNS + 1)
    if tree.count <= 1:
        return None
    parts = []
    flow = WORKFLOWS.get(run.agent.name)
    if flow is not None:
        parts.append(_workflow_picture(flow, run, tree.runs))
    if tree.count > TREE_PICTURE_MAX_RUNS:
        parts.append(_levels_summary(tree.runs, tree.count))
    else:
        parts.append(_runs_picture(tree.runs, link=link))
    parts.append(_legend())
    return mark_safe("".join(parts))


def _levels(runs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The runs by depth, each level in the order of its parents, then of its place among siblings."""
    children: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for node in runs[1:]:
        children[node["parent"]].append(node)
    for siblings in children.values():
        siblings.sort(key=lambda node: (node["round"] or 0, node["index"] or 0, node["submitted_at"]))
    levels, level = [], [runs[0]]
    while level:
        levels.append(level)
        level = [child for node in level for child in children.get(node["id"], [])]
    return levels


def _runs_picture(runs: list[dict[str, Any]], *, link: Callable[[Any], str]) -> str:
    levels = _levels(runs)
    widest = max(len(level) for level in levels)
    width, height = MARGIN * 2 + max(widest - 1, 1) * STEP, MARGIN * 2 + (len(levels) - 1) * LEVEL
    where: dict[Any, tuple[float, float]] = {}
    for depth, level in enumerate(levels):
        gap = (width - 2 * MARGIN) / max(len(level) - 1, 1)
        for place, node in enumerate(level):
            x = MARGIN + place * gap if len(level) > 1 else width / 2
            where[node["id"]] = (x, MARGIN + depth * LEVEL)
    edges = "".join(
        f'<line x1="{where[node["parent"]][0]:.1f}" y1="{where[node["parent"]][1]:.1f}" '
        f'x2="{where[node["id"]][0]:.1f}" y2="{where[node["id"]][1]:.1f}" stroke="#cbd5e1"/>'
        for level in levels[1:]
        for node in level
        if node["parent"] in where
    )
    nodes = "".join(
        format_html(
            '<a href="{}" class="tree-run" data-status="{}"><circle cx="{}" cy="{}" r="{}" fill="{}">'
            "<title>{} · {}{}</title></circle></a>",
            link(node["id"]),
            node["status"],
            f"{where[node['id']][0]:.1f}",
            f"{where[node['id']][1]:.1f}",
            RADIUS,
            COLOURS.get(node["status"], NOT_STARTED),
            node["agent"],
            node["status"],
            " · cached" if node["cached"] else " · shared" if node["follows"] else "",
        )
        for level in levels
        for node in level
    )
    return (
        f'<svg class="run-tree" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'role="img" aria-label="the run and the runs below it">{edges}{nodes}</svg>'
    )


def _levels_summary(runs: list[dict[str, Any]], count: int) -> str:
    rows = "".join(
        format_html(
            "<tr><td>{}</td><td>{}</td></tr>",
            depth,
            ", ".join(f"{n} {status}" for status, n in sorted(Counter(node["status"] for node in level).items())),
        )
        for depth, level in enumerate(_levels(runs))
    )
    return (
        f"<p>{count} runs: too many to draw one by one; the first {len(runs)} by depth:</p>"
        f'<table class="run-tree-levels"><tr><th>depth</th><th>runs</th></tr>{rows}</table>'
    )


def _step_status(statuses: list[str]) -> str | None:
    """One status for the runs of a step: failed or cancelled first, then in flight, then succeeded."""
    for status in (RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.EXPIRED):
        if status in statuses:
            return status
    for status in (RunStatus.RUNNING, RunStatus.WAITING, RunStatus.QUEUED):
        if status in statuses:
            return status
    return RunStatus.SUCCEEDED if statuses else None


def _workflow_picture(flow: Workflow, run: Run, runs: list[dict[str, Any]]) -> str:
    """The workflow's steps as a DAG by depth; a step's colour tells how its runs stand."""
    depth: dict[str, int] = {}
    for name in flow.steps:
        _depth_of(flow, name, depth)
    # The workflow starts every ready step in one round and waits for all of them: a step's round is its
    # depth + 1, and its runs are that round's children of its agent.
    children = [node for node in runs[1:] if node["parent"] == run.pk]
    statuses: dict[str, list[str]] = {}
    for name, step in flow.steps.items():
        statuses[name] = [
            node["status"] for node in children if node["round"] == depth[name] + 1 and node["agent"] == step.agent
        ]
    by_depth: dict[int, list[str]] = defaultdict(list)
    for name in flow.steps:
        by_depth[depth[name]].append(name)
    box_w, box_h, gap_x, gap_y = 150, 34, 30, 36
    widest = max(len(names) for names in by_depth.values())
    width = MARGIN * 2 + widest * box_w + (widest - 1) * gap_x
    height = MARGIN * 2 + len(by_depth) * box_h + (len(by_depth) - 1) * gap_y
    where: dict[str, tuple[float, float]] = {}
    for level, names in sorted(by_depth.items()):
        row_width = len(names) * box_w + (len(names) - 1) * gap_x
        for place, name in enumerate(names):
            where[name] = ((width - row_width) / 2 + place * (box_w + gap_x), MARGIN + level * (box_h + gap_y))
    edges = "".join(
        f'<line x1="{where[up][0] + box_w / 2:.1f}" y1="{where[up][1] + box_h:.1f}" '
        f'x2="{where[name][0] + box_w / 2:.1f}" y2="{where[name][1]:.1f}" stroke="#94a3b8" marker-end="url(#arrow)"/>'
        for name, step in flow.steps.items()
        for up in sorted(step.upstream())
    )
    boxes = []
    for name, step in flow.steps.items():
        status = _step_status(statuses[name])
        x, y = where[name]
        label = f"{name} ({len(statuses[name])})" if step.map is not None else name
        boxes.append(
            format_html(
                '<g class="workflow-step" data-step="{}" data-status="{}"><rect x="{}" y="{}" width="{}" height="{}" '
                'rx="6" fill="{}"/><text x="{}" y="{}" text-anchor="middle" font-size="12">{}</text>'
                "<title>{} · {} · {}</title></g>",
                name,
                status or "not started",
                f"{x:.1f}",
                f"{y:.1f}",
                box_w,
                box_h,
                COLOURS.get(status, NOT_STARTED),
                f"{x + box_w / 2:.1f}",
                f"{y + box_h / 2 + 4:.1f}",
                label,
                name,
                step.agent,
                status or "not started",
            )
        )
    arrow = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker></defs>'
    )
    return (
        f'<svg class="workflow-dag" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'role="img" aria-label="the workflow\'s steps">{arrow}{edges}{"".join(boxes)}</svg>'
    )


def _depth_of(flow: Workflow, name: str, depth: dict[str, int]) -> int:
    if name not in depth:
        upstream = flow.steps[name].upstream()
        depth[name] = 1 + max((_depth_of(flow, up, depth) for up in upstream), default=-1)
    return depth[name]


def _legend() -> str:
    items = "".join(
        f'<span style="display:inline-block;margin-right:1em"><svg width="12" height="12"><circle cx="6" cy="6" '
        f'r="5" fill="{colour}"/></svg> {escape(status)}</span>'
        for status, colour in COLOURS.items()
    )
    return f'<p class="run-tree-legend">{items}</p>'
