"""Multi-step word problems: one to three arithmetic steps wrapped in a short story."""

from __future__ import annotations

import random
from collections.abc import Callable

from ._build import Draft

__all__ = ["FAMILY", "QUOTAS", "make"]

FAMILY = "word_problems"
QUOTAS = {1: 34, 2: 34, 3: 28, 4: 22, 5: 20}

_NAMES = (
    ("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Ben", "he"), ("Lena", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Lucas", "he"), ("Priya", "she"), ("Jack", "he"), ("Mei", "she"), ("Diego", "he"),
)
_THINGS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")
_SUFFIX = " Answer with just the number."

# -> (values, story, answer, steps); the values are the numbers only: names and objects are
# decoration, so "12 apples" and "12 marbles" with the same numbers are the same question
Maker = Callable[[random.Random], tuple[tuple, str, int, int]]


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_NAMES)


def _buy_give(rng: random.Random, big: bool) -> tuple[tuple, str, int, int]:
    name, pron = _person(rng)
    thing = rng.choice(_THINGS)
    hi = 90 if big else 20
    a, b = rng.randint(5, hi), rng.randint(2, hi)
    c = rng.randint(1, a + b - 1)
    story = (f"{name} has {a} {thing}. {pron.capitalize()} buys {b} more and then gives {c} to a friend. "
             f"How many {thing} does {name} have now?")
    return (a, b, c), story, a + b - c, 2


def _speed(rng: random.Random) -> tuple[tuple, str, int, int]:
    v, t = rng.choice(range(20, 130, 10)), rng.randint(2, 6)
    vehicle = rng.choice(("train", "car", "bus"))
    story = f"A {vehicle} travels at {v} kilometers per hour for {t} hours. How many kilometers does it travel?"
    return (v, t), story, v * t, 1


def _share(rng: random.Random) -> tuple[tuple, str, int, int]:
    name, _ = _person(rng)
    thing = rng.choice(_THINGS)
    k, each = rng.randint(2, 8), rng.randint(2, 12)
    story = f"{name} shares {k * each} {thing} equally among {k} friends. How many {thing} does each friend get?"
    return (k * each, k), story, each, 1


def _left_after_spending(rng: random.Random) -> tuple[tuple, str, int, int]:
    name, pron = _person(rng)
    a, b = rng.randint(10, 50), rng.randint(1, 9)
    story = f"{name} has {a} dollars and spends {b} dollars on a snack. How many dollars does {pron} have left?"
    return (a, b), story, a - b, 1


def _change(rng: random.Random) -> tuple[tuple, str, int, int]:
    name, pron = _person(rng)
    item = rng.choice(("pen", "notebook", "sandwich", "ticket"))
    p, q = rng.randint(2, 9), rng.randint(2, 5)
    bill = 20 if p * q < 20 else 50
    story = (f"A {item} costs {p} dollars. {name} buys {q} of them and pays with a {bill}-dollar bill. "
             f"How much change does {pron} get, in dollars?")
    return (p, q, bill), story, bill - p * q, 2


def _age(rng: random.Random) -> tuple[tuple, str, int, int]:
    (n1, _), (n2, _) = rng.sample(_NAMES, 2)
    d, a, y = rng.randint(2, 15), rng.randint(5, 40), rng.randint(2, 10)
    story = f"{n1} is {d} years older than {n2}. {n2} is {a} years old. How old will {n1} be in {y} years?"
    return (d, a, y), story, a + d + y, 2


def _garden(rng: random.Random) -> tuple[tuple, str, int, int]:
    rows, per = rng.randint(3, 12), rng.randint(4, 15)
    dead = rng.randint(1, rows * per // 3)
    story = (f"A garden has {rows} rows with {per} plants in each row. {dead} plants die. "
             f"How many plants are left?")
    return (rows, per, dead), story, rows * per - dead, 2


def _pages(rng: random.Random) -> tuple[tuple, str, int, int]:
    name, _ = _person(rng)
    r, d = rng.randint(5, 30), rng.randint(2, 9)
    p = r * d + rng.randint(10, 200)
    story = f"A book has {p} pages. {name} reads {r} pages a day for {d} days. How many pages are left to read?"
    return (p, r, d), story, p - r * d, 2


def _savings(rng: random.Random) -> tuple[tuple, str, int, int]:
    name, pron = _person(rng)
    s, w = rng.randint(5, 25), rng.randint(3, 12)
    x = rng.randint(5, s * w - 1)
    thing = rng.choice(("game", "bike helmet", "book", "jacket"))
    story = (f"{name} saves {s} dollars every week. After {w} weeks, {pron} spends {x} dollars on a {thing}. "
             f"How many dollars does {name} have left?")
    return (s, w, x), story, s * w - x, 2


def _temperature(rng: random.Random) -> tuple[tuple, str, int, int]:
    t, up = rng.randint(-10, 10), rng.randint(3, 15)
    down = rng.randint(up + 1, up + 25)
    story = (f"At 6 a.m. the temperature was {t} degrees. By noon it rose by {up} degrees, and by midnight "
             f"it had fallen by {down} degrees from the noon value. What was the temperature at midnight, in degrees?")
    return (t, up, down), story, t + up - down, 2


def _tickets(rng: random.Random) -> tuple[tuple, str, int, int]:
    a, c = rng.randint(8, 20), rng.randint(3, 7)
    na, nc = rng.randint(1, 4), rng.randint(1, 5)
    story = (f"Adult tickets cost {a} dollars and child tickets cost {c} dollars. A family buys {na} adult "
             f"tickets and {nc} child tickets. How much do they pay in total, in dollars?")
    return (a, c, na, nc), story, a * na + c * nc, 3


def _bakery(rng: random.Random) -> tuple[tuple, str, int, int]:
    goods = rng.choice(("muffins", "rolls", "cupcakes", "bagels"))
    k = rng.choice((4, 6, 8, 12))
    boxes = rng.randint(3, 15)
    c = rng.randint(5, 40)
    rest = boxes * k + c
    a = rng.randint(rest // 3, rest - 5)
    b = rest - a
    story = (f"A bakery makes {a} {goods} in the morning and {b} in the afternoon. It sells {c} of them and "
             f"packs the rest into boxes of {k}. How many boxes does it fill?")
    return (a, b, c, k), story, boxes, 3


def _discount(rng: random.Random) -> tuple[tuple, str, int, int]:
    pct = rng.choice((10, 20, 25, 30, 40, 50))
    price = rng.choice(range(20, 301, 20))
    item = rng.choice(("jacket", "lamp", "bicycle", "backpack"))
    story = f"A {item} costs {price} dollars. It is on sale for {pct}% off. What is the sale price in dollars?"
    return (pct, price), story, price * (100 - pct) // 100, 2


def _workers(rng: random.Random) -> tuple[tuple, str, int, int]:
    per_hour, workers, hours = rng.randint(3, 12), rng.randint(2, 6), rng.randint(2, 8)
    made = rng.randint(5, 30)
    story = (f"Each worker in a workshop makes {per_hour} toys per hour. {workers} workers work for {hours} hours. "
             f"They already had {made} toys in stock. How many toys do they have now?")
    return (per_hour, workers, hours, made), story, per_hour * workers * hours + made, 3


_BY_LEVEL: dict[int, tuple[tuple[str, Maker], ...]] = {
    1: (("speed", _speed), ("share", _share), ("spend", _left_after_spending)),
    2: (("buy_give", lambda g: _buy_give(g, big=False)), ("age", _age)),
    3: (("change", _change), ("garden", _garden), ("pages", _pages),
        ("buy_give_big", lambda g: _buy_give(g, big=True))),
    4: (("savings", _savings), ("temperature", _temperature), ("tickets", _tickets), ("discount", _discount)),
    5: (("bakery", _bakery), ("workers", _workers)),
}


def make(rng: random.Random, level: int) -> Draft:
    template, maker = rng.choice(_BY_LEVEL[level])
    values, story, answer, steps = maker(rng)
    return Draft(
        key=(template, *values),
        prompt=story + _SUFFIX,
        answers=(str(answer),),
        scorer="number",
        features={"difficulty": level, "answer_type": "number", "subtype": template, "n_steps": steps,
                  "max_digits": max(len(str(abs(v))) for v in values if isinstance(v, int))},
    )
