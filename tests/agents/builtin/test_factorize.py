import math

import pytest

from agents.builtin.factorize import FactorizeInput, factorize, is_prime, prime_factors


@pytest.mark.parametrize(
    ("n", "factors"),
    [
        (2, [2]),
        (12, [2, 2, 3]),
        (97, [97]),
        (2**64 + 1, [274177, 67280421310721]),
        (1_000_000_007 * 998_244_353, [998_244_353, 1_000_000_007]),
        ((2**61 - 1) * (2**31 - 1), [2**31 - 1, 2**61 - 1]),
    ],
)
def test_prime_factors(n, factors):
    assert prime_factors(n) == factors


def test_factors_multiply_back_to_n_and_are_prime():
    n = 600851475143 * 9999999967

    factors = prime_factors(n)

    assert math.prod(factors) == n
    assert all(is_prime(factor) for factor in factors)


def test_carmichael_numbers_are_not_prime():
    assert not is_prime(561)
    assert not is_prime(3215031751)


def test_the_agent_reports_primality():
    assert factorize(None, FactorizeInput(n=2**61 - 1)) == {"n": 2**61 - 1, "factors": [2**61 - 1], "is_prime": True}


def test_the_input_refuses_numbers_below_two():
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        FactorizeInput(n=1)
