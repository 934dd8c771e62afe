"""Task suites that measure the small model, the cloud model and the router between them.

Seven generated families (arithmetic, word problems, unit conversion, factual QA,
yes/no reasoning, string manipulation, number sequences), about 1,200 items,
deterministic, split into ``dev`` (calibration) and ``test`` (reporting) with
no question (template plus values) in both. Every prompt asks for a short
answer, the way an app would; :func:`score` reads the answer out of a chatty
reply and compares it exactly::

    from edge_runtime.tasks import load_suite, score
    items = load_suite("default", split="dev")
    s = score(items[0], "The answer is 42.")
    s.correct, s.extracted, s.parse_error

User suites: ``load_suite("my_tasks.jsonl")``, one JSON object per line with
``id``, ``family``, ``messages``, ``answers``, ``scorer`` (``number``, ``yesno``,
``text``, ``text_cs``, ``exact``) and optionally ``features`` and ``split``.
"""

from __future__ import annotations

from ._scoring import SCORERS, score, score_text
from ._suites import FAMILIES, SPLITS, SUITE_SEED, describe_suites, dump_suite, first_items, list_suites, load_suite, summarize
from ._types import ANSWER_TYPES, Score, TaskItem

__all__ = [
    "TaskItem",
    "Score",
    "ANSWER_TYPES",
    "load_suite",
    "first_items",
    "list_suites",
    "describe_suites",
    "dump_suite",
    "summarize",
    "score",
    "score_text",
    "SCORERS",
    "FAMILIES",
    "SPLITS",
    "SUITE_SEED",
]
