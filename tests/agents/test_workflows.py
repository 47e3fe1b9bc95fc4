"""Workflows declared in code: checked when declared, started and followed like any agent."""

import io
import json

import pytest
from django.core.management import CommandError, call_command
from pydantic import BaseModel

from agents.models import Run, RunStatus
from agents.registry import RegistryError
from agents.workflows import Step, ref, workflow
from tests.agents.test_execution import submit, wait


class EmptyInput(BaseModel):
    pass


def declare(*steps: Step) -> None:
    workflow(name="test.flow", input=EmptyInput, steps=list(steps))


def test_a_cycle_is_refused_when_declared_naming_its_steps():
    with pytest.raises(RegistryError, match=r"steps a -> b -> a form a cycle|steps b -> a -> b form a cycle"):
        declare(Step("a", agent="echo", input={"x": ref("b.x")}), Step("b", agent="echo", input={"x": ref("a.x")}))


def test_an_unknown_agent_is_refused_when_declared_naming_the_step():
    with pytest.raises(RegistryError, match=r"step 'a' names agent 'nobody'"):
        declare(Step("a", agent="nobody"))


def test_a_reference_to_a_step_the_workflow_lacks_is_refused_naming_the_step():
    with pytest.raises(RegistryError, match=r"step 'b' refers to 'missing'"):
        declare(Step("a", agent="echo"), Step("b", agent="echo", input={"x": ref("missing.y")}))


def test_an_item_outside_a_mapped_step_is_refused_naming_the_step():
    with pytest.raises(RegistryError, match=r"step 'a' refers to `item` but maps over nothing"):
        declare(Step("a", agent="echo", input={"x": ref("item")}))


def test_a_step_declared_twice_is_refused():
    with pytest.raises(RegistryError, match=r"step 'a' is declared twice"):
        declare(Step("a", agent="echo"), Step("a", agent="echo"))


CORPUS = "\n---\n".join(
    [
        "Agents delegate work. Workers run agents.",
        "Queues hold messages until workers take them.",
        "Agents delegate work. Workers run agents.",
        "Caches answer what was computed before.",
        "Agents delegate work. Workers run agents.",
    ]
)


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_workflow_maps_over_a_list_and_gathers_every_result_into_one_report(api):
    run = submit(api, "corpus.report", {"text": CORPUS})

    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded", finished
    report = finished["result"]["outputs"]["report"]
    assert report["documents"] == 5
    assert report["words"] == 6 * 3 + 7 + 6
    steps = finished["result"]["steps"]
    assert sum(steps.values()) == 1 + 5 + 1
    # Three copies of one document: analysed once, the others from the cache or following it.
    analyses = Run.objects.filter(root=run["id"], agent__name="text_stats")
    executed = analyses.filter(cached=False, follows__isnull=True)
    assert analyses.count() == 5
    assert executed.count() == 3
    assert steps["cached"] + steps["coalesced"] == 2


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_workflow_run_again_finds_every_analysis_in_the_cache(api):
    wait(api, submit(api, "corpus.report", {"text": CORPUS})["id"], seconds=30)

    again = wait(api, submit(api, "corpus.report", {"text": CORPUS})["id"], seconds=30)

    assert again["status"] == "succeeded"
    assert again["result"]["steps"]["cached"] == 5


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_a_workflow_is_submitted_in_a_batch_with_an_idempotency_key_like_any_agent(api):
    body = {"runs": [{"agent": "corpus.report", "input": {"text": CORPUS}, "idempotency_key": "report-1"}]}

    first = api.post("/api/v1/runs/batch/", body, format="json")
    repeat = api.post("/api/v1/runs/", body["runs"][0], format="json")

    assert first.status_code == 201
    assert repeat.status_code == 200
    assert repeat.json()["id"] == first.json()[0]["id"]
    assert wait(api, repeat.json()["id"], seconds=30)["status"] == "succeeded"
    assert Run.objects.filter(root=repeat.json()["id"], status=RunStatus.SUCCEEDED).count() == 7


@pytest.mark.slow
@pytest.mark.usefixtures("transactional_db", "workers")
def test_the_corpus_report_command_prints_the_report_and_what_its_steps_cost(staff, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One small document here.\n---\nAnother, longer document is here.\n---\nOne small document here.")
    out = io.StringIO()

    call_command("corpus_report", str(corpus), stdout=out, stderr=io.StringIO())

    printed = out.getvalue()
    report = json.loads(printed[: printed.rindex("}") + 1])
    assert report["documents"] == 3
    assert "steps computed: 4, from the cache: " in printed  # split, two distinct analyses, the report


def test_the_corpus_report_command_names_a_missing_file(db, staff):
    with pytest.raises(CommandError, match=r"cannot read the corpus /nowhere\.txt"):
        call_command("corpus_report", "/nowhere.txt")
