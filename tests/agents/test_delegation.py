"""Multi-agent work on real workers: delegation, fan-out and fan-in, signals and timers, holding no worker."""

import uuid

import pytest

from agents.models import Run, RunStatus
from tests.agents.test_execution import submit, wait, wait_for_status
from tests.agents.test_recovery import counter
from tests.factories import UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("transactional_db", "workers")]


def children_of(run_id: str) -> list[Run]:
    return list(Run.objects.filter(parent_id=run_id).order_by("sibling_index"))


def test_a_fan_out_gathers_every_childs_result_into_the_parents(api):
    run = submit(api, "test.fan", {"numbers": list(range(1, 11))})

    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"total": 385, "failed": [], "asked": 10}
    assert finished["children"] == {"succeeded": 10}
    assert [child.input["n"] for child in children_of(run["id"])] == list(range(1, 11))


def test_children_work_for_their_parents_owner_on_its_tier_and_within_its_deadline(api):
    run = submit(api, "test.fan", {"numbers": [1, 2]}, tier="batch")

    wait(api, run["id"], seconds=30)

    parent = Run.objects.get(pk=run["id"])
    for child in children_of(run["id"]):
        assert child.submitted_by_id == parent.submitted_by_id
        assert child.tier == "batch"
        assert child.deadline <= parent.deadline
        assert child.root == parent.pk


def test_a_parent_holds_no_worker_while_its_children_run(api):
    run = submit(api, "test.fan", {"numbers": [1, 2, 3], "seconds": 1.5})

    waiting = wait_for_status(run["id"], RunStatus.WAITING)

    assert waiting.worker == ""
    assert waiting.lease_expires_at is None
    assert wait(api, run["id"], seconds=30)["result"]["total"] == 14


def test_a_tree_five_levels_deep_with_a_hundred_leaves_completes_on_two_processes(api):
    # The standard pool has two processes: a parent that held one while waiting would starve its children.
    run = submit(api, "test.tree", {"fanouts": [2, 2, 5, 5]})

    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"leaves": 100}
    assert Run.objects.filter(root=run["id"]).count() == 2 + 4 + 20 + 100
    assert not Run.objects.filter(root=run["id"]).exclude(status=RunStatus.SUCCEEDED).exists()


def test_a_failed_child_fails_its_parent_by_default(api):
    run = submit(api, "test.fan", {"numbers": [1, 2, 3], "fail_on": [2]})

    finished = wait(api, run["id"], seconds=30)

    failed_child = Run.objects.get(parent_id=run["id"], input__n=2)
    assert finished["status"] == "failed"
    assert finished["error"]["type"] == "ChildFailed"
    assert str(failed_child.pk) in finished["error"]["message"]


def test_a_continuation_that_asked_to_continue_sees_the_failed_children(api):
    run = submit(api, "test.fan", {"numbers": [1, 2, 3], "fail_on": [2], "on_failure": "continue"})

    finished = wait(api, run["id"], seconds=30)

    failed_child = Run.objects.get(parent_id=run["id"], input__n=2)
    assert finished["status"] == "succeeded"
    assert finished["result"] == {"total": 10, "failed": [str(failed_child.pk)], "asked": 3}


def test_an_agent_can_be_the_continuation_and_its_result_the_parents(api):
    run = submit(api, "test.fan", {"numbers": [1, 2, 3], "then_agent": True})

    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"total": 14}
    handover = Run.objects.get(parent_id=run["id"], agent__name="test.add_children")
    assert handover.status == RunStatus.SUCCEEDED


def test_a_fan_out_over_repeated_items_computes_each_distinct_item_once(api):
    keys = [uuid.uuid4().hex for _ in range(3)]
    run = submit(api, "test.cached_fan", {"keys": [keys[0], keys[1], keys[0], keys[2], keys[1], keys[0]]})

    finished = wait(api, run["id"], seconds=30)

    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"children": 6}
    assert [counter("count", key) for key in keys] == [1, 1, 1]


def test_a_run_waiting_for_a_signal_goes_on_with_its_payload(api):
    run = submit(api, "test.approval", {})
    wait_for_status(run["id"], RunStatus.WAITING)

    response = api.post(
        f"/api/v1/runs/{run['id']}/signal/", {"name": "approve", "payload": {"by": "ada"}}, format="json"
    )
    finished = wait(api, run["id"], seconds=20)

    assert response.status_code == 200, response.content
    assert finished["status"] == "succeeded"
    assert finished["result"] == {"approved": {"by": "ada"}, "timed_out": False}


def test_a_signal_the_run_does_not_wait_for_answers_409_naming_the_one_it_does(api):
    run = submit(api, "test.approval", {})
    wait_for_status(run["id"], RunStatus.WAITING)

    response = api.post(f"/api/v1/runs/{run['id']}/signal/", {"name": "reject"}, format="json")

    assert response.status_code == 409
    assert response.json()["waits_for"] == "approve"
    assert Run.objects.get(pk=run["id"]).status == RunStatus.WAITING


def test_another_users_signal_finds_no_run(api, api_for):
    run = submit(api, "test.approval", {})
    wait_for_status(run["id"], RunStatus.WAITING)

    response = api_for(UserFactory()).post(f"/api/v1/runs/{run['id']}/signal/", {"name": "approve"}, format="json")

    assert response.status_code == 404
    assert Run.objects.get(pk=run["id"]).status == RunStatus.WAITING


def test_a_signal_that_never_comes_times_out_into_the_continuation(api):
    run = submit(api, "test.approval", {"timeout": 0.5})

    finished = wait(api, run["id"], seconds=20)

    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"approved": None, "timed_out": True}


def test_a_run_sleeps_without_a_worker_and_goes_on(api):
    run = submit(api, "test.nap", {"seconds": 0.5})

    finished = wait(api, run["id"], seconds=20)

    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"slept": 0.5}


def test_cancelling_a_parent_cancels_its_children_in_flight(api):
    run = submit(api, "test.fan", {"numbers": [1, 2, 3, 4], "seconds": 5})
    wait_for_status(run["id"], RunStatus.WAITING)

    response = api.post(f"/api/v1/runs/{run['id']}/cancel/")

    assert response.status_code == 200
    assert {child.status for child in children_of(run["id"])} == {RunStatus.CANCELLED}
    assert wait(api, run["id"])["status"] == "cancelled"


def test_the_tree_view_lists_every_run_below_with_its_status(api):
    run = submit(api, "test.tree", {"fanouts": [2, 3]})
    wait(api, run["id"], seconds=30)

    tree = api.get(f"/api/v1/runs/{run['id']}/tree/").json()

    assert tree["count"] == 1 + 2 + 6
    assert tree["truncated"] is False
    assert tree["runs"][0]["id"] == run["id"]
    assert {node["status"] for node in tree["runs"]} == {"succeeded"}
    assert sum(node["parent"] == run["id"] for node in tree["runs"]) == 2


def test_runs_can_be_listed_by_parent(api):
    run = submit(api, "test.fan", {"numbers": [1, 2, 3]})
    wait(api, run["id"], seconds=30)

    listed = api.get("/api/v1/runs/", {"parent": run["id"]}).json()

    assert listed["count"] == 3
    assert {item["parent"] for item in listed["results"]} == {run["id"]}


def test_a_supervisor_hands_a_failed_child_to_another_tier_and_succeeds(api):
    run = submit(api, "test.supervisor", {"n": 7})

    finished = wait(api, run["id"], seconds=30)

    first, second = children_of_rounds(run["id"])
    assert finished["status"] == "succeeded", finished
    assert finished["result"] == {"square": 49, "redelegated": str(first.pk)}
    assert (first.status, first.tier) == (RunStatus.FAILED, "standard")
    assert (second.status, second.tier) == (RunStatus.SUCCEEDED, "batch")


def children_of_rounds(run_id: str) -> list[Run]:
    return list(Run.objects.filter(parent_id=run_id).order_by("parent_round", "sibling_index"))
