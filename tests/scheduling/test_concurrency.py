import time
import uuid

import pytest

from scheduling.concurrency import slot_acquire, slot_release, slot_wait, slots_held, slots_wake


@pytest.fixture
def agent_name() -> str:
    return f"agent-{uuid.uuid4().hex[:8]}"


def test_slots_are_granted_up_to_the_limit(agent_name):
    granted = [slot_acquire(agent=agent_name, run_id=f"r{i}", limit=2, lease_seconds=60) for i in range(3)]

    assert granted == [True, True, False]
    assert slots_held(agent_name) == 2


def test_a_run_that_holds_a_slot_gets_it_again(agent_name):
    slot_acquire(agent=agent_name, run_id="r1", limit=1, lease_seconds=60)

    assert slot_acquire(agent=agent_name, run_id="r1", limit=1, lease_seconds=60)


def test_a_released_slot_goes_to_the_oldest_waiting_run(agent_name):
    slot_acquire(agent=agent_name, run_id="r1", limit=1, lease_seconds=60)
    slot_wait(agent=agent_name, run_id="r2")
    slot_wait(agent=agent_name, run_id="r3")

    woken = slot_release(agent=agent_name, run_id="r1", limit=1)

    assert woken == ["r2"]


def test_the_slot_of_a_dead_worker_frees_itself_when_its_lease_runs_out(agent_name):
    slot_acquire(agent=agent_name, run_id="killed", limit=1, lease_seconds=0.2)
    slot_wait(agent=agent_name, run_id="next")
    assert not slot_acquire(agent=agent_name, run_id="other", limit=1, lease_seconds=60)

    time.sleep(0.3)

    assert slots_wake(agent=agent_name, limit=1) == ["next"]
    assert slot_acquire(agent=agent_name, run_id="next", limit=1, lease_seconds=60)
