import math
import random

from pydantic import BaseModel, Field

from agents.registry import agent
from scheduling.tiers import Tier

# Deterministic Miller-Rabin for n < 3.3e24 with these bases; larger n use them too (error < 4^-13).
MILLER_RABIN_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


class FactorizeInput(BaseModel):
    n: int = Field(ge=2, lt=2**128, description="The integer to factor.")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in MILLER_RABIN_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in MILLER_RABIN_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _pollard_brent(n: int, rng: random.Random) -> int:
    """A non-trivial factor of composite n."""
    if n % 2 == 0:
        return 2
    while True:
        y, c, m = rng.randrange(1, n), rng.randrange(1, n), 128
        g = r = q = 1
        x = ys = y
        while g == 1:
            x = y
            for _ in range(r):
                y = (y * y + c) % n
            k = 0
            while k < r and g == 1:
                ys = y
                for _ in range(min(m, r - k)):
                    y = (y * y + c) % n
                    q = q * abs(x - y) % n
                g = math.gcd(q, n)
                k += m
            r *= 2
        if g == n:
            g = 1
            while g == 1:
                ys = (ys * ys + c) % n
                g = math.gcd(abs(x - ys), n)
        if g != n:
            return g


def prime_factors(n: int) -> list[int]:
    """Prime factors of n in ascending order, with multiplicity."""
    factors: list[int] = []
    for p in (2, 3, 5, 7, 11, 13):
        while n % p == 0:
            factors.append(p)
            n //= p
    # Seeded by n: the same input takes the same path, so the work is repeatable.
    rng = random.Random(n)
    stack = [n] if n > 1 else []
    while stack:
        m = stack.pop()
        if is_prime(m):
            factors.append(m)
            continue
        d = _pollard_brent(m, rng)
        stack.extend((d, m // d))
    return sorted(factors)


@agent(name="factorize", input=FactorizeInput, tier=Tier.BATCH, cache_ttl=86400, soft_time_limit=300, time_limit=330)
def factorize(ctx, input: FactorizeInput) -> dict:
    """Factor an integer into primes (Miller-Rabin and Pollard-Brent): CPU-bound and deterministic."""
    factors = prime_factors(input.n)
    return {"n": input.n, "factors": factors, "is_prime": factors == [input.n]}
