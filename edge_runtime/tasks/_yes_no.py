"""Yes/no reasoning: primality, comparisons (with the 3.9-vs-3.11 trap), divisibility, checking a product.

Each draft picks its truth value first, then values that make it true or
false; half the questions at every difficulty level are "yes".
"""

from __future__ import annotations

import math
import random

from ._build import Draft, collect

__all__ = ["FAMILY", "QUOTAS", "generate", "make", "is_prime"]

FAMILY = "yes_no"
QUOTAS = {1: 40, 2: 40, 3: 30, 4: 24, 5: 22}
_SUFFIX = " Answer yes or no."


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, math.isqrt(n) + 1))


def _draft(level: int, subtype: str, values: tuple, question: str, truth: bool, max_digits: int) -> Draft:
    return Draft(
        key=(subtype, *values),
        prompt=question + _SUFFIX,
        answers=("yes" if truth else "no",),
        scorer="yesno",
        features={"difficulty": level, "answer_type": "yesno", "subtype": subtype, "max_digits": max_digits},
    )


def _prime(rng: random.Random, level: int, truth: bool) -> Draft:
    lo, hi = {1: (2, 20), 2: (21, 100), 3: (101, 500), 4: (101, 400), 5: (501, 2000)}[level]
    if level in (4, 5) and not truth:
        # the hard composites: products of two primes >= 7, no small factor to spot
        primes = [p for p in range(7, 60) if is_prime(p)]
        while True:
            a, b = rng.choice(primes), rng.choice(primes)
            if lo <= a * b <= hi:
                n = a * b
                break
    else:
        while True:
            n = rng.randint(lo, hi)
            if is_prime(n) == truth and (truth or level < 3 or n % 2):  # odd composites from level 3 on
                break
    return _draft(level, "prime", (n,), f"Is {n} a prime number?", truth, len(str(n)))


def _compare(rng: random.Random, level: int, truth: bool) -> Draft:
    if level == 1:
        a, b = rng.sample(range(1, 20), 2)
    elif level == 2:
        a, b = rng.sample(range(100, 1000), 2)
    else:  # negatives
        a, b = rng.sample(range(-50, 10), 2)
    if (a > b) != truth:
        a, b = b, a
    word = rng.choice(("greater than", "larger than"))
    return _draft(level, "compare_int", (a, b), f"Is {a} {word} {b}?", truth, max(len(str(abs(a))), len(str(abs(b)))))


def _compare_decimal(rng: random.Random, level: int, truth: bool) -> Draft:
    # different numbers of decimal places: 3.9 vs 3.11 reads as "9 < 11" to a careless reader
    whole = rng.randint(1, 20)
    a = f"{whole}.{rng.randint(1, 9)}"
    b = f"{whole}.{rng.randint(10, 99)}"
    if float(a) == float(b):
        b = f"{whole}.{rng.randint(10, 99)}1"
    if (float(a) > float(b)) != truth:
        a, b = b, a
    return _draft(level, "compare_decimal", (a, b), f"Is {a} greater than {b}?", truth, len(str(whole)))


def _divisible(rng: random.Random, level: int, truth: bool) -> Draft:
    d = {2: rng.choice((2, 5, 10)), 3: rng.choice((3, 4, 6, 9)), 4: rng.choice((7, 8, 11, 12, 13))}[level]
    lo, hi = {2: (10, 200), 3: (20, 500), 4: (100, 999)}[level]
    while True:
        n = rng.randint(lo, hi)
        if (n % d == 0) == truth:
            break
    return _draft(level, "divisible", (n, d), f"Is {n} divisible by {d}?", truth, len(str(n)))


def _even(rng: random.Random, level: int, truth: bool) -> Draft:
    n = rng.randint(1, 50) if level == 1 else rng.randint(1000, 99999)
    if (n % 2 == 0) != truth:
        n += 1
    text = f"{n:,}" if n >= 1000 else str(n)
    return _draft(level, "even", (n,), f"Is {text} an even number?", truth, len(str(n)))


def _product(rng: random.Random, level: int, truth: bool) -> Draft:
    a, b = (rng.randint(3, 12), rng.randint(3, 12)) if level == 3 else (rng.randint(12, 40), rng.randint(11, 30))
    c = a * b
    if not truth:
        c += rng.choice((-10, -2, -1, 1, 2, 10))
    t = rng.choice(("×", "*"))
    return _draft(level, "product_check", (a, b, c), f"Is {a} {t} {b} equal to {c}?", truth, len(str(c)))


def _sum_compare(rng: random.Random, level: int, truth: bool) -> Draft:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    s = a + b
    c = s - rng.randint(1, 30) if truth else s + rng.randint(0, 30)
    return _draft(level, "sum_compare", (a, b, c), f"Is {a} + {b} greater than {c}?", truth, 4)


def _square(rng: random.Random, level: int, truth: bool) -> Draft:
    k = rng.randint(11, 40)
    n = k * k if truth else k * k + rng.choice((-1, 1, 2, k))
    return _draft(level, "perfect_square", (n,), f"Is {n} a perfect square?", truth, len(str(n)))


_BY_LEVEL = {
    1: (_prime, _compare, _even),
    2: (_prime, _compare, _divisible, _even),
    3: (_prime, _compare, _divisible, _product),
    4: (_prime, _compare_decimal, _divisible, _product),
    5: (_prime, _compare_decimal, _sum_compare, _square),
}


def make(rng: random.Random, level: int, truth: bool) -> Draft:
    return rng.choice(_BY_LEVEL[level])(rng, level, truth)


def generate(rng: random.Random) -> list[Draft]:
    """Exactly half "yes" and half "no" at every level: a model that always says one word scores 50%."""
    out: list[Draft] = []
    for truth in (True, False):
        half = {level: quota // 2 + (quota % 2 if truth else 0) for level, quota in QUOTAS.items()}
        out += collect(rng, half, lambda r, level: make(r, level, truth), family=FAMILY)
    return out
