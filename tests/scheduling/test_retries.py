import pytest

from scheduling.retries import retry_delay


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5])
def test_the_delay_lies_between_half_and_all_of_the_exponential_step(attempt):
    step = 2.0 * 2 ** (attempt - 1)

    delays = [retry_delay(attempt, base=2.0, cap=1000) for _ in range(200)]

    assert all(step / 2 <= delay <= step for delay in delays)


def test_the_delay_never_exceeds_the_cap():
    assert max(retry_delay(30, base=1.0, cap=10) for _ in range(200)) <= 10


def test_delays_are_jittered():
    assert len({retry_delay(3, base=1.0, cap=100) for _ in range(50)}) > 1


def test_the_defaults_come_from_settings(settings):
    settings.RETRY_BACKOFF_BASE_SECONDS = 4
    settings.RETRY_BACKOFF_MAX_SECONDS = 1000

    assert 4 <= retry_delay(2) <= 8
