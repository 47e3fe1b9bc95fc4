import pytest

from scheduling.admission import AdmissionRefused, Backlog, admission_check, share_check, share_limit
from scheduling.tiers import Tier


def backlogs(critical=(0, 100), standard=(0, 100), batch=(0, 100), drain=10.0):
    return {
        tier: Backlog(queued=queued, limit=limit, drain_per_second=drain)
        for tier, (queued, limit) in zip(Tier, (critical, standard, batch), strict=True)
    }


def test_a_submission_within_the_limit_is_admitted():
    admission_check(tier=Tier.STANDARD, incoming=10, backlogs=backlogs(standard=(90, 100)), yield_fraction=0.5)


def test_a_submission_over_the_limit_is_refused():
    with pytest.raises(AdmissionRefused, match="standard backlog is 95 runs; the limit is 100"):
        admission_check(tier=Tier.STANDARD, incoming=10, backlogs=backlogs(standard=(95, 100)), yield_fraction=0.5)


def test_retry_after_is_the_excess_over_the_drain_rate():
    with pytest.raises(AdmissionRefused) as refused:
        admission_check(
            tier=Tier.BATCH, incoming=50, backlogs=backlogs(batch=(100, 100), drain=5.0), yield_fraction=0.5
        )

    assert refused.value.retry_after == 10  # 50 runs over, draining 5/s


def test_retry_after_stays_within_one_second_and_five_minutes():
    assert Backlog(queued=10_000, limit=1, drain_per_second=1).retry_after(0) == 300
    assert Backlog(queued=101, limit=100, drain_per_second=1000).retry_after(0) == 1


def test_batch_yields_while_a_higher_tier_is_past_its_share():
    with pytest.raises(AdmissionRefused, match="batch yields while the standard backlog"):
        admission_check(tier=Tier.BATCH, incoming=1, backlogs=backlogs(standard=(60, 100)), yield_fraction=0.5)


def test_standard_does_not_yield_to_critical():
    admission_check(tier=Tier.STANDARD, incoming=1, backlogs=backlogs(critical=(99, 100)), yield_fraction=0.5)


def test_a_users_share_is_a_fraction_of_the_tier_limit_and_at_least_one_run():
    assert share_limit(tier_limit=2000, share=0.5) == 1000
    assert share_limit(tier_limit=3, share=0.1) == 1


def test_a_user_within_their_share_is_admitted():
    share_check(tier=Tier.STANDARD, incoming=2, backlog=Backlog(queued=8, limit=10, drain_per_second=1), share=0.5)


def test_a_user_over_their_share_is_refused_naming_it_with_retry_after_from_their_drain():
    with pytest.raises(AdmissionRefused, match="share is 25% of the tier's limit, 10 runs") as refused:
        share_check(
            tier=Tier.CRITICAL, incoming=5, backlog=Backlog(queued=10, limit=10, drain_per_second=0.5), share=0.25
        )

    assert refused.value.retry_after == 10  # 5 runs over, draining 0.5/s
