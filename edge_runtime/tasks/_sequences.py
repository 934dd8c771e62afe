"""Number sequences: give the next term of an arithmetic, geometric, square, Fibonacci-like or alternating pattern."""

from __future__ import annotations

import random

from ._build import Draft

__all__ = ["FAMILY", "QUOTAS", "make"]

FAMILY = "sequences"
QUOTAS = {1: 28, 2: 28, 3: 22, 4: 18, 5: 16}

_PHRASINGS = (
    "What number comes next in the sequence {seq}, ...? Answer with just the number.",
    "Continue the pattern: {seq}, ? Reply with only the next number.",
)


def _arith(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    if level == 1:
        start, step = rng.randint(1, 20), rng.choice((1, 2, 5, 10))
    elif level == 2:
        start, step = rng.randint(1, 50), rng.randint(3, 9)
    else:  # descending through zero
        start, step = rng.randint(5, 30), -rng.randint(3, 9)
    terms = [start + i * step for i in range(5)]
    return "arithmetic" if step > 0 else "arithmetic_down", terms, start + 5 * step


def _geom(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    ratio = 2 if level == 2 else 3
    start = rng.randint(1, 6 if ratio == 2 else 4)
    terms = [start * ratio**i for i in range(4)]
    return f"geometric_x{ratio}", terms, start * ratio**4


def _halving(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    end = rng.randint(1, 9)
    terms = [end * 2 ** (4 - i) for i in range(4)]
    return "halving", terms, end


def _squares(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    k = rng.randint(1, 4) if level == 3 else rng.randint(3, 12)
    terms = [(k + i) ** 2 for i in range(4)]
    return "squares", terms, (k + 4) ** 2


def _fib(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    terms = [a, b]
    while len(terms) < 6:
        terms.append(terms[-1] + terms[-2])
    return "fibonacci_like", terms, terms[-1] + terms[-2]


def _growing_step(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    start, d = rng.randint(1, 20), rng.randint(1, 3)
    terms = [start]
    for i in range(4):
        terms.append(terms[-1] + d + i)
    return "growing_step", terms, terms[-1] + d + 4


def _alternating(rng: random.Random, level: int) -> tuple[str, list[int], int]:
    start, up, down = rng.randint(1, 30), rng.randint(3, 9), rng.randint(1, 5)
    if up == down:
        up += 1
    terms = [start]
    for i in range(5):
        terms.append(terms[-1] + (up if i % 2 == 0 else -down))
    # steps shown: +up, -down, +up, -down, +up; the next one is -down
    return "alternating", terms, terms[-1] - down


_BY_LEVEL = {
    1: (_arith,),
    2: (_arith, _geom),
    3: (_arith, _geom, _halving, _squares),
    4: (_squares, _fib, _growing_step),
    5: (_alternating, _fib, _growing_step),
}


def make(rng: random.Random, level: int) -> Draft:
    kind, terms, answer = rng.choice(_BY_LEVEL[level])(rng, level)
    seq = ", ".join(str(t) for t in terms)
    return Draft(
        key=(kind, *terms),
        prompt=rng.choice(_PHRASINGS).format(seq=seq),
        answers=(str(answer),),
        scorer="number",
        features={"difficulty": level, "answer_type": "number", "subtype": kind, "n_terms": len(terms),
                  "max_digits": max(len(str(abs(t))) for t in terms)},
    )
