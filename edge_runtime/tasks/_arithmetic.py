"""Arithmetic with graded difficulty, from "3 + 4" (level 1) to "417 × 38" and "15% of 240" (level 5)."""

from __future__ import annotations

import random

from ._build import Draft

__all__ = ["FAMILY", "QUOTAS", "make"]

FAMILY = "arithmetic"
QUOTAS = {1: 60, 2: 60, 3: 48, 4: 36, 5: 36}

_PHRASINGS = (
    "What is {expr}? Answer with just the number.",
    "Calculate {expr}. Reply with only the result.",
    "{expr} = ? Give only the number.",
    "Compute {expr}. Respond with just the number, nothing else.",
)


def _fmt(n: int | str) -> str:
    # numbers of 4+ digits are written the way people write them: 4,382
    return f"{n:,}" if isinstance(n, int) and abs(n) >= 1000 else str(n)


def _digits(*values: int) -> int:
    return max(len(str(abs(v))) for v in values)


def _draft(rng: random.Random, level: int, op: str, values: tuple, expr: str, answer: int | str, n_operands: int,
           max_digits: int) -> Draft:
    prompt = rng.choice(_PHRASINGS).format(expr=expr)
    return Draft(
        key=(op, *values),
        prompt=prompt,
        answers=(str(answer),),
        scorer="number",
        features={"difficulty": level, "answer_type": "number", "subtype": op, "n_operands": n_operands,
                  "max_digits": max_digits},
    )


def _times(rng: random.Random) -> str:
    return rng.choice(("×", "*"))


def make(rng: random.Random, level: int) -> Draft:
    r = rng.randint
    if level == 1:
        kind = rng.choice(("add", "sub", "mul"))
        if kind == "add":
            a, b = r(1, 9), r(1, 9)
            return _draft(rng, level, kind, (a, b), f"{a} + {b}", a + b, 2, 1)
        if kind == "sub":
            a, b = sorted((r(1, 9), r(1, 9)), reverse=True)
            return _draft(rng, level, kind, (a, b), f"{a} - {b}", a - b, 2, 1)
        a, b = r(2, 5), r(2, 5)
        return _draft(rng, level, kind, (a, b), f"{a} {_times(rng)} {b}", a * b, 2, 1)
    if level == 2:
        kind = rng.choice(("add", "sub", "mul"))
        if kind == "add":
            a, b = r(10, 99), r(10, 99)
            return _draft(rng, level, kind, (a, b), f"{a} + {b}", a + b, 2, 2)
        if kind == "sub":
            a, b = r(20, 99), r(2, 9)
            return _draft(rng, level, kind, (a, b), f"{a} - {b}", a - b, 2, 2)
        a, b = r(3, 9), r(6, 9)
        return _draft(rng, level, kind, (a, b), f"{a} {_times(rng)} {b}", a * b, 2, 1)
    if level == 3:
        kind = rng.choice(("add3", "sub_neg", "mul21", "div"))
        if kind == "add3":
            a, b = r(100, 999), r(100, 999)
            op = rng.choice("+-")
            return _draft(rng, level, kind + op, (a, b), f"{a} {op} {b}", a + b if op == "+" else a - b, 2, 3)
        if kind == "sub_neg":
            a, b = r(10, 49), r(50, 99)
            return _draft(rng, level, kind, (a, b), f"{a} - {b}", a - b, 2, 2)
        if kind == "mul21":
            a, b = r(12, 99), r(3, 9)
            return _draft(rng, level, kind, (a, b), f"{a} {_times(rng)} {b}", a * b, 2, 2)
        q, b = r(3, 12), r(3, 9)
        return _draft(rng, level, kind, (q * b, b), f"{q * b} {rng.choice(('÷', '/'))} {b}", q, 2, len(str(q * b)))
    if level == 4:
        kind = rng.choice(("mul22", "three", "div3", "dec"))
        if kind == "mul22":
            a, b = r(12, 99), r(12, 99)
            return _draft(rng, level, kind, (a, b), f"{a} {_times(rng)} {b}", a * b, 2, 2)
        if kind == "three":
            a, b, c = r(20, 99), r(20, 99), r(20, 99)
            return _draft(rng, level, kind, (a, b, c), f"{a} + {b} - {c}", a + b - c, 3, 2)
        if kind == "div3":
            q, b = r(11, 60), r(6, 19)
            return _draft(rng, level, kind, (q * b, b), f"{q * b} {rng.choice(('÷', '/'))} {b}", q, 2, len(str(q * b)))
        # decimals with different numbers of places: 2.5 + 3.75
        a_c, b_c = r(11, 99), r(101, 999)
        a, b = f"{a_c / 10:.1f}", f"{b_c / 100:.2f}"
        total = f"{(a_c * 10 + b_c) / 100:.2f}"
        return _draft(rng, level, kind, (a, b), f"{a} + {b}", total, 2, 1)
    kind = rng.choice(("mul32", "add4", "prec", "neg_mul", "pct"))
    if kind == "mul32":
        a, b = r(101, 999), r(11, 99)
        return _draft(rng, level, kind, (a, b), f"{a} {_times(rng)} {b}", a * b, 2, 3)
    if kind == "add4":
        a, b = r(1000, 9999), r(1000, 9999)
        op = rng.choice("+-")
        return _draft(rng, level, kind + op, (a, b), f"{_fmt(a)} {op} {_fmt(b)}", a + b if op == "+" else a - b, 2, 4)
    if kind == "prec":
        a, b, c = r(2, 30), r(3, 12), r(3, 12)
        t = _times(rng)
        return _draft(rng, level, kind, (a, b, c), f"{a} + {b} {t} {c}", a + b * c, 3, 2)
    if kind == "neg_mul":
        a, b, c = r(2, 20), r(21, 40), r(3, 9)
        return _draft(rng, level, kind, (a, b, c), f"({a} - {b}) {_times(rng)} {c}", (a - b) * c, 3, 2)
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 60, 75))
    base = rng.choice(range(20, 1001, 20))  # pct is a multiple of 5, so pct * base / 100 is whole
    return _draft(rng, level, kind, (pct, base), f"{pct}% of {base}", pct * base // 100, 2, len(str(base)))
