"""Unit conversion: metric prefixes (easy), time and imperial factors (medium), temperature and chains (hard).

Values are chosen so that every answer is exact (an integer or a short decimal):
the item tests the conversion, not rounding conventions.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

from ._build import Draft

__all__ = ["FAMILY", "QUOTAS", "make"]

FAMILY = "unit_conversion"
QUOTAS = {1: 36, 2: 36, 3: 28, 4: 20, 5: 20}

_PHRASINGS = (
    "How many {dst} are in {v} {src}? Answer with just the number.",
    "Convert {v} {src} to {dst}. Reply with only the number.",
    "{v} {src} is how many {dst}? Give just the number.",
)

# (source, target, factor, difficulty, category, values): answer = value * factor.
# ``values`` draws a value that makes the answer exact.
Conversion = tuple[str, str, Fraction, int, str, Callable[[random.Random], Fraction]]


def _ints(lo: int, hi: int, step: int = 1) -> Callable[[random.Random], Fraction]:
    return lambda rng: Fraction(rng.randrange(lo, hi + 1, step))


def _halves(lo: int, hi: int) -> Callable[[random.Random], Fraction]:
    # 1.5, 2.5, ...: a decimal input with an exact answer under x10/x100/x1000
    return lambda rng: Fraction(2 * rng.randint(lo, hi) + 1, 2)


_CONVERSIONS: tuple[Conversion, ...] = (
    ("kilometers", "meters", Fraction(1000), 1, "metric", _ints(2, 20)),
    ("meters", "centimeters", Fraction(100), 1, "metric", _ints(2, 30)),
    ("centimeters", "millimeters", Fraction(10), 1, "metric", _ints(2, 90)),
    ("kilograms", "grams", Fraction(1000), 1, "metric", _ints(2, 20)),
    ("liters", "milliliters", Fraction(1000), 1, "metric", _ints(2, 15)),
    ("weeks", "days", Fraction(7), 2, "time", _ints(2, 12)),
    ("hours", "minutes", Fraction(60), 2, "time", _ints(2, 12)),
    ("minutes", "seconds", Fraction(60), 2, "time", _ints(2, 15)),
    ("years", "months", Fraction(12), 2, "time", _ints(2, 10)),
    ("feet", "inches", Fraction(12), 2, "imperial", _ints(2, 10)),
    ("yards", "feet", Fraction(3), 2, "imperial", _ints(2, 30)),
    ("kilometers", "meters", Fraction(1000), 3, "metric_decimal", _halves(1, 9)),
    ("meters", "kilometers", Fraction(1, 1000), 3, "metric_decimal", _ints(500, 9500, 500)),
    ("grams", "kilograms", Fraction(1, 1000), 3, "metric_decimal", _ints(250, 5000, 250)),
    ("centimeters", "meters", Fraction(1, 100), 3, "metric_decimal", _ints(50, 950, 50)),
    ("days", "hours", Fraction(24), 3, "time", _ints(2, 9)),
    ("pounds", "ounces", Fraction(16), 3, "imperial", _ints(2, 12)),
    ("gallons", "quarts", Fraction(4), 3, "imperial", _ints(2, 20)),
    ("minutes", "hours", Fraction(1, 60), 3, "time", _ints(30, 600, 30)),
    ("hours", "seconds", Fraction(3600), 4, "chain", _ints(2, 9)),
    ("square meters", "square centimeters", Fraction(10000), 4, "area", _ints(2, 9)),
    ("miles", "feet", Fraction(5280), 4, "imperial", _ints(2, 6)),
    ("inches", "feet", Fraction(1, 12), 4, "imperial", _ints(24, 144, 12)),
    ("milliliters", "liters", Fraction(1, 1000), 4, "metric_decimal", _ints(250, 4750, 250)),
    ("days", "minutes", Fraction(1440), 5, "chain", _ints(2, 5)),
    ("weeks", "hours", Fraction(168), 5, "chain", _ints(2, 4)),
    ("kilometers per hour", "meters per second", Fraction(1000, 3600), 5, "chain", _ints(18, 180, 18)),
    ("cubic meters", "liters", Fraction(1000), 5, "volume", _halves(1, 6)),
)


def _fmt(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    text = f"{float(x):.6f}".rstrip("0").rstrip(".")
    if Fraction(text) != x:  # pragma: no cover - guarded by the value generators above
        raise ValueError(f"{x} has no short decimal form")
    return text


def _temperature(rng: random.Random, level: int) -> Draft:
    if level == 4:  # Celsius -> Fahrenheit: multiples of 5 give whole answers
        c = 5 * rng.randint(-8, 20)
        v, ans, src, dst = c, Fraction(c * 9, 5) + 32, "degrees Celsius", "degrees Fahrenheit"
    else:  # Fahrenheit -> Celsius
        k = rng.randint(-6, 22)
        v, ans, src, dst = 32 + 9 * k, Fraction(5 * k), "degrees Fahrenheit", "degrees Celsius"
    prompt = f"What is {v} {src} in {dst}? Answer with just the number."
    return Draft(
        key=("temperature", src, v),
        prompt=prompt,
        answers=(_fmt(ans),),
        scorer="number",
        features={"difficulty": level, "answer_type": "number", "subtype": f"{src}->{dst}",
                  "category": "temperature", "max_digits": len(str(abs(v)))},
    )


def make(rng: random.Random, level: int) -> Draft:
    if level in (4, 5) and rng.random() < 0.3:
        return _temperature(rng, level)
    src, dst, factor, _, category, values = rng.choice([c for c in _CONVERSIONS if c[3] == level])
    value = values(rng)
    v = _fmt(value)
    prompt = rng.choice(_PHRASINGS).format(v=v, src=src, dst=dst)
    return Draft(
        key=(f"{src}->{dst}", v),
        prompt=prompt,
        answers=(_fmt(value * factor),),
        scorer="number",
        features={"difficulty": level, "answer_type": "number", "subtype": f"{src}->{dst}", "category": category,
                  "max_digits": len(str(int(value)))},
    )
