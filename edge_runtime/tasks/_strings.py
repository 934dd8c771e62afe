"""String manipulation: letters, length, reversal, counting, case, alphabetical order.

Easy for a program, hard for a small model that sees tokens rather than letters.
"""

from __future__ import annotations

import functools
import random
from importlib import resources

from ._build import Draft

__all__ = ["FAMILY", "QUOTAS", "make", "words"]

FAMILY = "string_manipulation"
QUOTAS = {1: 38, 2: 38, 3: 30, 4: 24, 5: 24}
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")


@functools.cache
def words() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("data/words.txt").read_text(encoding="utf-8")
    return tuple(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


def _pick(rng: random.Random, lo: int, hi: int) -> str:
    return rng.choice([w for w in words() if lo <= len(w) <= hi])


def _draft(level: int, subtype: str, values: tuple, prompt: str, answer: str, scorer: str, word_len: int) -> Draft:
    features = {"difficulty": level, "answer_type": "number" if scorer == "number" else "text", "subtype": subtype}
    if subtype != "length":  # for "how many letters" the word length *is* the answer: no feature may leak it
        features["word_length"] = word_len
    return Draft(key=(subtype, *values), prompt=prompt, answers=(answer,), scorer=scorer, features=features)


def _length(rng: random.Random, level: int) -> Draft:
    lo, hi = {1: (3, 4), 2: (5, 6), 3: (7, 8), 4: (9, 10)}[level]
    w = _pick(rng, lo, hi)
    return _draft(level, "length", (w,), f"How many letters are in the word \"{w}\"? Answer with just the number.",
                  str(len(w)), "number", len(w))


def _first_last(rng: random.Random, level: int) -> Draft:
    w = _pick(rng, 3, 10)
    which = "first" if level == 1 else "last"
    letter = w[0] if which == "first" else w[-1]
    return _draft(level, f"{which}_letter", (w,), f"What is the {which} letter of the word \"{w}\"? "
                  "Answer with just the letter.", letter, "text", len(w))


def _nth(rng: random.Random, level: int) -> Draft:
    w = _pick(rng, 6, 10)
    i = rng.randint(2, min(6, len(w) - 2))
    return _draft(level, "nth_letter", (w, i), f"What is the {_ORDINALS[i]} letter of the word \"{w}\"? "
                  "Answer with just the letter.", w[i], "text", len(w))


def _upper(rng: random.Random, level: int) -> Draft:
    w = _pick(rng, 4, 9)
    return _draft(level, "uppercase", (w,), f"Write the word \"{w}\" in capital letters. Answer with just the word.",
                  w.upper(), "text_cs", len(w))


def _reverse(rng: random.Random, level: int) -> Draft:
    lo, hi = {3: (3, 3), 4: (4, 5), 5: (6, 8)}[level]
    w = _pick(rng, lo, hi)
    return _draft(level, "reverse", (w,), f"Write the word \"{w}\" backwards, letter by letter. "
                  "Answer with just the reversed word.", w[::-1], "text", len(w))


def _count_letter(rng: random.Random, level: int) -> Draft:
    w = _pick(rng, 5, 10)
    # mostly letters that occur (often twice or more), sometimes one that does not
    letters = sorted(set(w), key=lambda c: (-w.count(c), c))
    c = rng.choice(letters[:2]) if rng.random() < 0.85 else rng.choice([x for x in "bdfgkmpwz" if x not in w])
    return _draft(level, "count_letter", (w, c), f"How many times does the letter \"{c}\" appear in the word \"{w}\"? "
                  "Answer with just the number.", str(w.count(c)), "number", len(w))


def _vowels(rng: random.Random, level: int) -> Draft:
    w = _pick(rng, 5, 10)
    n = sum(ch in "aeiou" for ch in w)
    return _draft(level, "count_vowels", (w,), f"How many vowels (a, e, i, o, u) are in the word \"{w}\"? "
                  "Answer with just the number.", str(n), "number", len(w))


def _alphabetical(rng: random.Random, level: int) -> Draft:
    k = 2 if level == 2 else 3
    while True:
        ws = rng.sample(words(), k)
        # level 4: words sharing a first letter, so the second letter decides
        if level < 4 or len({w[0] for w in ws}) == 1:
            break
        first = ws[0][0]
        same = [w for w in words() if w[0] == first]
        if len(same) >= k:
            ws = rng.sample(same, k)
            break
    listed = ", ".join(f'"{w}"' for w in ws)
    return _draft(level, "alphabetical_first", tuple(sorted(ws)), f"Which of these words comes first in alphabetical "
                  f"order: {listed}? Answer with just the word.", min(ws), "text", max(len(w) for w in ws))


def _initials(rng: random.Random, level: int) -> Draft:
    ws = rng.sample(words(), 4)
    listed = ", ".join(f'"{w}"' for w in ws)
    return _draft(level, "initials", tuple(ws), f"Join the first letters of these words, in order, into one string: "
                  f"{listed}. Answer with just the letters.", "".join(w[0] for w in ws), "text", max(map(len, ws)))


_BY_LEVEL = {
    1: (_length, _first_last),
    2: (_length, _first_last, _upper, _alphabetical),
    3: (_length, _nth, _reverse, _alphabetical),
    4: (_length, _count_letter, _reverse, _alphabetical),
    5: (_vowels, _reverse, _initials, _count_letter),
}


def make(rng: random.Random, level: int) -> Draft:
    return rng.choice(_BY_LEVEL[level])(rng, level)
