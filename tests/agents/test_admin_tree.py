"""The admin's run page draws the run's tree: every run below it coloured by status and linked to its page."""

import re

import pytest
from django.urls import reverse

from agents.models import Agent, RunStatus
from tests.factories import RunFactory

pytestmark = pytest.mark.django_db


def page(client, run) -> str:
    response = client.get(reverse("admin:agents_run_change", args=[run.pk]))
    assert response.status_code == 200
    return response.content.decode()


def child_of(parent, *, status=RunStatus.SUCCEEDED, round=1, index=0, agent=None, **fields):
    extra = {"agent": agent} if agent is not None else {}
    return RunFactory(
        parent=parent, root=parent.root or parent.pk, submitted_by=parent.submitted_by, status=status,
        parent_round=round, sibling_index=index, **extra, **fields,
    )  # fmt: skip


def test_a_run_page_draws_every_run_below_it_coloured_by_status_and_linked(staff_client):
    root = RunFactory(status=RunStatus.WAITING)
    children = [child_of(root, index=i, status=status) for i, status in enumerate(["succeeded", "running"])]
    grandchild = child_of(children[1], status=RunStatus.FAILED)

    html = page(staff_client, root)

    drawn = re.findall(r'<a href="([^"]+)" class="tree-run" data-status="(\w+)">', html)
    expected = [root, *children, grandchild]
    assert sorted(drawn) == sorted((reverse("admin:agents_run_change", args=[run.pk]), run.status) for run in expected)
    assert '<svg class="run-tree"' in html


def test_a_run_with_no_children_draws_no_tree(staff_client):
    html = page(staff_client, RunFactory(finished=True))

    assert "run-tree" not in html.replace("run-tree-legend", "")


def test_a_workflow_run_page_draws_its_steps_as_a_dag_coloured_by_their_runs(staff_client):
    workflow = RunFactory(agent=Agent.objects.get(name="corpus.report"), status=RunStatus.WAITING)
    child_of(workflow, agent=Agent.objects.get(name="corpus.split"), round=1)
    analyses = Agent.objects.get(name="text_stats")
    for index, status in enumerate([RunStatus.SUCCEEDED, RunStatus.RUNNING, RunStatus.SUCCEEDED]):
        child_of(workflow, agent=analyses, round=2, index=index, status=status)

    html = page(staff_client, workflow)

    steps = dict(re.findall(r'class="workflow-step" data-step="(\w+)" data-status="([\w ]+)"', html))
    assert steps == {"split": "succeeded", "analyse": "running", "report": "not started"}
    assert ">analyse (3)</text>" in html
