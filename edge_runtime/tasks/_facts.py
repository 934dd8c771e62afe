"""Factual questions from ``data/facts.json``: capitals, continents, elements, planets, authors, currencies."""

from __future__ import annotations

import functools
import json
import random
from importlib import resources
from typing import Any

from ._build import Draft

__all__ = ["FAMILY", "QUOTAS", "generate", "load_facts", "pool"]

FAMILY = "factual_qa"
QUOTAS = {1: 50, 2: 56, 3: 50, 4: 36, 5: 24}

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
_TEXT_SUFFIX = {
    "city": " Answer with just the city name.",
    "country": " Answer with just the country name.",
    "continent": " Answer with just the continent name.",
    "element": " Answer with just the element name.",
    "symbol": " Answer with just the symbol.",
    "number": " Answer with just the number.",
    "planet": " Answer with just the planet name.",
    "person": " Answer with just the name.",
    "currency": " Answer with just the name of the currency.",
    "language": " Answer with just the language.",
    "short": " Answer in a word or two.",
}


@functools.cache
def load_facts() -> dict[str, Any]:
    """The project's fact file (read once per process)."""
    text = resources.files(__package__).joinpath("data/facts.json").read_text(encoding="utf-8")
    return json.loads(text)


def _q(qtype: str, entity: str, prompt: str, answers: list[str], level: int, topic: str, scorer: str = "text") -> Draft:
    answer_type = "number" if scorer == "number" else "text"
    return Draft(
        key=(qtype, entity),
        prompt=prompt,
        answers=tuple(dict.fromkeys(answers)),
        scorer=scorer,
        features={"difficulty": max(1, min(5, level)), "answer_type": answer_type, "subtype": qtype, "topic": topic},
    )


def _bare(name: str) -> str:
    return name[4:] if name.startswith("the ") else name


@functools.cache
def pool() -> dict[int, tuple[Draft, ...]]:
    """Every factual question the data supports, by difficulty level."""
    f = load_facts()
    drafts: list[Draft] = []
    for c in f["countries"]:
        name, cap, fame = c["name"], c["capital"], c["fame"]
        caps = [cap, *c.get("capital_aliases", [])]
        names = [_bare(name), *c.get("aliases", [])]
        drafts.append(_q("capital_of", name, f"What is the capital of {name}?" + _TEXT_SUFFIX["city"], caps, fame,
                         "geography"))
        drafts.append(_q("country_of_capital", cap, f"{cap} is the capital of which country?" + _TEXT_SUFFIX["country"],
                         names, fame + 1, "geography"))
        if c["continent"]:
            drafts.append(_q("continent", name, f"On which continent is {name}?" + _TEXT_SUFFIX["continent"],
                             [c["continent"]], fame, "geography"))
    for e in f["elements"]:
        name, sym, num, fame = e["name"], e["symbol"], e["number"], e["fame"]
        names = [name, *e.get("aliases", [])]
        drafts.append(_q("element_symbol", name, f"What is the chemical symbol for {name}?" + _TEXT_SUFFIX["symbol"],
                         [sym], fame, "chemistry", scorer="text_cs"))
        drafts.append(_q("element_from_symbol", sym, f'Which chemical element has the symbol "{sym}"?'
                         + _TEXT_SUFFIX["element"], names, fame + 1, "chemistry"))
        drafts.append(_q("atomic_number", name, f"What is the atomic number of {name}?" + _TEXT_SUFFIX["number"],
                         [str(num)], fame + 2, "chemistry", scorer="number"))
        drafts.append(_q("element_from_number", str(num), f"Which chemical element has atomic number {num}?"
                         + _TEXT_SUFFIX["element"], names, fame + 2, "chemistry"))
    for i, planet in enumerate(f["planets"]):
        easy = planet in ("Mercury", "Earth")
        drafts.append(_q("planet_by_order", planet, f"Counting outward from the Sun, which planet is {_ORDINALS[i]}?"
                         + _TEXT_SUFFIX["planet"], [planet], 2 if easy else 3, "astronomy"))
        drafts.append(_q("planet_position", planet, f"Counting outward from the Sun, in which position is {planet}? "
                         "Answer with just the number (1 for the closest planet).", [str(i + 1)], 3 if easy else 4,
                         "astronomy", scorer="number"))
    for w in f["works"]:
        verb = w["kind"]
        drafts.append(_q(f"who_{verb}", w["title"], f"Who {verb} {w['title']}?" + _TEXT_SUFFIX["person"],
                         [w["creator"], *w["aliases"]], w["fame"] + 1, "literature" if verb == "wrote" else "art"))
    for cur in f["currencies"]:
        drafts.append(_q("currency", cur["country"], f"What is the currency of {cur['country']} called?"
                         + _TEXT_SUFFIX["currency"], [cur["currency"], *cur["aliases"]], cur["fame"] + 1, "economics"))
    for lang in f["languages"]:
        drafts.append(_q("language", lang["country"], f"What is the main language spoken in {lang['country']}?"
                         + _TEXT_SUFFIX["language"], [lang["language"], *lang["aliases"]], lang["fame"], "language"))
    for g in f["general"]:
        scorer = g.get("scorer", "text")
        suffix = _TEXT_SUFFIX["number"] if scorer == "number" else _TEXT_SUFFIX["short"]
        drafts.append(_q("general", g["q"], g["q"] + suffix, g["a"], g["difficulty"], g["topic"], scorer=scorer))
    by_level: dict[int, list[Draft]] = {}
    for d in drafts:
        by_level.setdefault(d.difficulty, []).append(d)
    return {k: tuple(v) for k, v in sorted(by_level.items())}


def generate(rng: random.Random) -> list[Draft]:
    """A sample of the pool: ``QUOTAS[level]`` distinct questions per difficulty level, drawn
    round-robin over question types so that capitals do not crowd out everything else."""
    out: list[Draft] = []
    levels = pool()
    for level, quota in sorted(QUOTAS.items()):
        candidates = levels.get(level, ())
        if len(candidates) < quota:
            raise RuntimeError(
                f"{FAMILY}: the fact file has {len(candidates)} questions at level {level}, wanted {quota}")
        by_type: dict[str, list[Draft]] = {}
        for d in candidates:
            by_type.setdefault(d.features["subtype"], []).append(d)
        queues = [rng.sample(v, len(v)) for _, v in sorted(by_type.items())]
        rng.shuffle(queues)
        taken = 0
        while taken < quota:
            for q in queues:
                if q and taken < quota:
                    out.append(q.pop())
                    taken += 1
    return out
