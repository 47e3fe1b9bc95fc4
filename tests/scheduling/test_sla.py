from datetime import UTC, datetime, timedelta

from scheduling.sla import escalation_due, run_deadline, sla_outcome

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_the_deadline_is_submission_plus_sla():
    assert run_deadline(submitted_at=T0, sla_seconds=60) == at(60)


def test_an_earlier_client_deadline_wins():
    assert run_deadline(submitted_at=T0, sla_seconds=60, requested=at(10)) == at(10)


def test_a_later_client_deadline_does_not_extend_the_sla():
    assert run_deadline(submitted_at=T0, sla_seconds=60, requested=at(600)) == at(60)


def test_finishing_by_the_deadline_meets_the_sla():
    assert sla_outcome(deadline=at(10), started_at=at(2), finished_at=at(10)) == (True, "")


def test_starting_after_the_deadline_blames_the_queue_wait():
    assert sla_outcome(deadline=at(10), started_at=at(11), finished_at=at(12)) == (False, "queue_wait")


def test_starting_in_time_but_finishing_late_blames_the_run_time():
    assert sla_outcome(deadline=at(10), started_at=at(5), finished_at=at(12)) == (False, "run_time")


def test_escalation_is_due_after_the_configured_share_of_the_sla():
    assert escalation_due(submitted_at=T0, sla_seconds=60, fraction=0.5) == at(30)
