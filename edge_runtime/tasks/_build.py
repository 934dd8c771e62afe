"""Shared machinery of the generated families: drafts, quotas, stable ids and the dev/test split.

A family generator produces :class:`Draft` items. A draft's ``key`` is the
question itself without its wording: the template (operation, question type)
plus the values ("add", 37, 48). Each key is drawn at most once, and the split
assigns whole keys, so no template-plus-values pair (under any phrasing) is in
both ``dev`` and ``test``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._types import TaskItem

__all__ = ["Draft", "collect", "assign_splits", "key_digest", "user_message"]


@dataclass(frozen=True)
class Draft:
    key: tuple[Any, ...]  # (template, *values): what makes two questions the same question
    prompt: str
    answers: tuple[str, ...]
    scorer: str
    features: Mapping[str, Any] = field(default_factory=dict)

    @property
    def difficulty(self) -> int:
        return int(self.features["difficulty"])


def key_digest(family: str, key: tuple[Any, ...]) -> str:
    return hashlib.sha256(repr((family, key)).encode("utf-8")).hexdigest()


def user_message(prompt: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": prompt},)


def collect(
    rng: random.Random,
    quotas: Mapping[int, int],
    make: Callable[[random.Random, int], Draft | None],
    *,
    family: str,
    max_tries_per_item: int = 200,
) -> list[Draft]:
    """Draw drafts from ``make(rng, difficulty)`` until each difficulty has its quota of
    distinct keys. Raises if a generator cannot supply enough distinct questions (a bug
    in the generator, caught by the tests, never a silent short suite)."""
    seen: set[tuple[Any, ...]] = set()
    prompts: set[str] = set()
    out: list[Draft] = []
    for level, quota in sorted(quotas.items()):
        got, tries = 0, 0
        while got < quota:
            tries += 1
            if tries > quota * max_tries_per_item:
                raise RuntimeError(f"{family}: only {got} distinct items at difficulty {level}, wanted {quota}")
            d = make(rng, level)
            if d is None or d.key in seen or d.prompt in prompts:
                continue
            seen.add(d.key)
            prompts.add(d.prompt)
            out.append(d)
            got += 1
    return out


def assign_splits(family: str, drafts: Iterable[Draft]) -> list[TaskItem]:
    """Turn drafts into items, half ``dev`` and half ``test`` within every difficulty level
    (and, for yes/no questions, within each answer).

    Order within a group is by the hash of the key, so the assignment of a
    question does not depend on which other questions were drawn before it.
    """
    groups: dict[tuple[int, str], list[tuple[str, Draft]]] = {}
    for d in drafts:
        stratum = d.answers[0] if d.scorer == "yesno" else ""
        groups.setdefault((d.difficulty, stratum), []).append((key_digest(family, d.key), d))
    items: list[TaskItem] = []
    i = 0  # runs on across groups: odd-sized groups give their extra item to dev and test in turn
    for group in sorted(groups):
        for digest, d in sorted(groups[group], key=lambda t: t[0]):
            features = {"difficulty": d.difficulty, **d.features, "template": str(d.key[0])}
            items.append(
                TaskItem(
                    id=f"{family}-{digest[:10]}",
                    family=family,
                    messages=user_message(d.prompt),
                    answers=d.answers,
                    scorer=d.scorer,
                    features=features,
                    split="dev" if i % 2 == 0 else "test",
                )
            )
            i += 1
    # ids are hashes: sorted by id, any prefix of a family (``--limit N``) is a fair sample of it
    return sorted(items, key=lambda item: item.id)
