"""Scorers: exact match of the extracted answer against an item's accepted answers.

A scorer is named by the item (``item.scorer``):

``number``   numeric equality of the extracted number ("1,234" == "1234" == "1234.0")
``yesno``    "yes" / "no" (also read from "Yes, 7 is prime." or "The answer is no.")
``text``     a short phrase, case-insensitive, accents/punctuation/leading article ignored
``text_cs``  the same, but letter case must match ("GARDEN", chemical symbols "Co")
``exact``    the whole reply, stripped and case-folded, equals an answer

:func:`score` never raises: an unparseable reply, or any failure inside a
scorer, is a wrong answer with ``parse_error`` saying why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal

from ._extract import extract_number, extract_yes_no, normalize_text, parse_number, text_candidates
from ._types import Score, TaskItem

__all__ = ["score", "score_text", "SCORERS", "check_answers"]


# (reply, accepted answers, question or None) -> Score
Scorer = Callable[[str, Sequence[str], str | None], Score]

_REL_TOL = Decimal("1e-9")  # decimals are exact; this only forgives "0.30000000001"-style float echoes
_WHOLE_ECHO = Decimal("1e-6")  # the most a float echo of a whole number is off by ("41.99999999999999")
_GROUPED = re.compile(r"[-+\u2212]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _integral(value: Decimal) -> bool:
    """Whole numbers compare exactly: 12345678900 is not 12345678901, however close relatively."""
    return value == value.to_integral_value()


def _tolerance(expected: Decimal) -> Decimal:
    """How far a reply may be from ``expected`` and still be its float echo ("0.30000000000000004", "41.99999999999999"):
    relative to the answer (a floor of 1 forgave 0 for 1e-9), and for a whole answer never a visible fraction (relative
    alone forgave 5000000004.9 for 5000000000)."""
    tol = abs(expected) * _REL_TOL
    return min(tol, _WHOLE_ECHO) if _integral(expected) else tol


def _score_number(reply: str, answers: Sequence[str], question: str | None = None) -> Score:
    raw, err = extract_number(reply, question)
    if raw is None:
        return Score(False, None, err)
    value = parse_number(raw)
    if value is None:  # pragma: no cover - the extraction regex only yields parseable numbers
        return Score(False, raw, f"cannot read {raw!r} as a number")
    for a in answers:
        expected = parse_number(a)
        if expected is None:
            continue
        if value == expected or (not (_integral(value) and _integral(expected))
                                 and abs(value - expected) <= _tolerance(expected)):
            return Score(True, raw, None)
    return Score(False, raw, None)


def _score_yes_no(reply: str, answers: Sequence[str], question: str | None = None) -> Score:
    got, err = extract_yes_no(reply, question)
    if got is None:
        return Score(False, None, err)
    return Score(got in {a.strip().lower() for a in answers}, got, None)


def _text_scorer(case_sensitive: bool) -> Scorer:
    def scorer(reply: str, answers: Sequence[str], question: str | None = None) -> Score:
        candidates = text_candidates(reply, question=question)
        if not candidates:
            return Score(False, None, "no short answer in the reply" if reply.strip() else "empty reply")
        accepted = {normalize_text(a, case_sensitive=case_sensitive) for a in answers}
        for c in candidates:
            if normalize_text(c, case_sensitive=case_sensitive) in accepted:
                return Score(True, c, None)
        return Score(False, candidates[0], None)

    return scorer


def _score_exact(reply: str, answers: Sequence[str], question: str | None = None) -> Score:
    got = reply.strip()
    if not got:
        return Score(False, None, "empty reply")
    return Score(got.casefold() in {a.strip().casefold() for a in answers}, got, None)


SCORERS: dict[str, Scorer] = {
    "number": _score_number,
    "yesno": _score_yes_no,
    "text": _text_scorer(case_sensitive=False),
    "text_cs": _text_scorer(case_sensitive=True),
    "exact": _score_exact,
}


def check_answers(scorer: str, answers: Sequence[str]) -> str | None:
    """Why ``answers`` cannot be scored by ``scorer`` (None when fine); used when loading suites."""
    if scorer not in SCORERS:
        return f"unknown scorer {scorer!r} (expected one of {', '.join(SCORERS)})"
    if scorer == "number":
        bad = [a for a in answers if parse_number(a) is None]
        if bad:
            return f"answer {bad[0]!r} is not a number"
        # a comma groups thousands ("1,234"); "1,5" would be read as 15, not 1.5
        grouped = [a for a in answers if "," in a and not _GROUPED.fullmatch(a.strip())]
        if grouped:
            return f"answer {grouped[0]!r} has a comma that does not group thousands (write 1.5 or 1,500)"
    if scorer == "yesno":
        bad = [a for a in answers if a.strip().lower() not in ("yes", "no")]
        if bad:
            return f"answer {bad[0]!r} is not yes or no"
        if {a.strip().lower() for a in answers} == {"yes", "no"}:
            return "both yes and no are accepted: every reply would be right"
    if scorer in ("text", "text_cs"):
        bad = [a for a in answers if not normalize_text(a)]
        if bad:
            return f"answer {bad[0]!r} is empty after normalisation"
    return None


def score_text(scorer: str, answers: Sequence[str], reply: str, *, question: str | None = None) -> Score:
    """Score ``reply`` against ``answers`` with the named scorer; never raises.

    ``question`` (the text asked) lets the number and yes/no scorers read a
    reply against it (a restated operand, a continued sequence, a restated
    claim); see :mod:`edge_runtime.tasks._extract`.
    """
    fn = SCORERS.get(scorer)
    if fn is None:
        return Score(False, None, f"unknown scorer {scorer!r}")
    if not isinstance(reply, str):
        return Score(False, None, f"reply is {type(reply).__name__}, not text")
    try:
        return fn(reply, answers, question)
    except Exception as err:  # a scorer bug must cost one item, not the whole evaluation run
        return Score(False, None, f"scorer {scorer!r} failed: {type(err).__name__}: {err}")


def score(item: TaskItem, text: str) -> Score:
    """Score one reply to ``item``: exact match after extraction. Never raises."""
    return score_text(item.scorer, item.answers, text, question=item.prompt)
