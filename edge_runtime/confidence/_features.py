"""Features for predicting whether a local answer is right, from signals the engine already has.

Every feature is computable for any request, not only for task-suite items:
per-token log-probability / entropy / top-1-top-2 margin aggregated several
ways (mean, min, first token, tail), the same aggregates over the *answer span*
only (the tokens of the number, yes/no or word the reply gives as its answer),
length, finish reason, whether an answer of the expected form was found, the
prompt's own perplexity under the model, and prompt-derived task features
(expected answer type, how many numbers and digits the question holds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tasks._extract import extract_number, extract_yes_no, text_candidates

__all__ = [
    "Signals",
    "signals_from_result",
    "signals_from_record",
    "expected_answer_type",
    "answer_span",
    "feature_vector",
    "no_answer",
    "FEATURES",
    "PROMPT_FEATURES",
    "SPAN_FEATURES",
]

_NUM = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Signals:
    """What is known about one local answer."""

    prompt: str
    text: str
    token_texts: Sequence[str]
    logprobs: Sequence[float]
    entropies: Sequence[float]
    margins: Sequence[float]
    finish_reason: str
    prompt_tokens: int
    prompt_nll: float | None


def _prompt_text(messages: Sequence[Mapping[str, Any]] | None, prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    for msg in reversed(messages or []):
        if msg.get("role") == "user":
            return str(msg.get("content", ""))
    return ""


def signals_from_result(result: Any, *, messages: Sequence[Mapping[str, Any]] | None = None, prompt: str | None = None) -> Signals:
    """From an engine GenerationResult (or a streamed prefix of one)."""
    return Signals(
        prompt=_prompt_text(messages, prompt),
        text=result.text,
        token_texts=[t.text for t in result.tokens],
        logprobs=[t.logprob for t in result.tokens],
        entropies=[t.entropy for t in result.tokens],
        margins=[t.margin for t in result.tokens],
        finish_reason=result.finish_reason,
        prompt_tokens=result.usage.prompt_tokens,
        prompt_nll=result.prompt_nll,
    )


def signals_from_record(record: Mapping[str, Any], prompt: str) -> Signals:
    """From a cached run record (``edge_runtime.runs``)."""
    return Signals(
        prompt=prompt, text=record["text"], token_texts=record["token_texts"], logprobs=record["logprobs"],
        entropies=record["entropies"], margins=record["margins"], finish_reason=record["finish_reason"],
        prompt_tokens=int(record["prompt_tokens"]), prompt_nll=record.get("prompt_nll"),
    )


def no_answer(text: str) -> bool:
    """Whether a reply holds no answer at all (no text, or blanks: a stop string matching at once, an eos first).
    Its p_correct is 0 wherever it is scored, live (the hybrid runtime) and in replay (the explorer, ``eval``): its
    token features read as certain ones, and the estimators scored it ~0.7, above a real answer (QA UU)."""
    return not text.strip()


def expected_answer_type(prompt: str) -> str:
    """What a prompt asks for: ``yesno``, ``number`` or ``text``, from its wording."""
    p = prompt.lower()
    if "yes or no" in p or "yes/no" in p:
        return "yesno"
    if "number" in p or re.search(r"how (many|much)|\d\s*[-+*/x×÷]\s*\d|=\s*\?", p):
        return "number"
    return "text"


def answer_span(text: str, answer_type: str) -> tuple[int, int] | None:
    """Character span of the answer a reader would take from ``text``, or None when there is none."""
    if answer_type == "number":
        value, _ = extract_number(text)
    elif answer_type == "yesno":
        value, _ = extract_yes_no(text)
    else:
        cands = text_candidates(text)
        value = cands[0] if cands else None
    if not value:
        return None
    if answer_type == "number":
        # the number as a whole: "5" of "15 - 10 = 5" was found inside the 15, whose tokens the span features then read
        whole = re.search(rf"(?<![\d.,]){re.escape(value)}(?!,?\.?\d)", text)
        if whole:
            return whole.span()
    idx = text.lower().find(value.lower())
    if idx < 0 and answer_type == "number":
        m = _NUM.search(text)
        return (m.start(), m.end()) if m else None
    return (idx, idx + len(value)) if idx >= 0 else None


def _token_range(token_texts: Sequence[str], span: tuple[int, int]) -> tuple[int, int]:
    """Indices [i, j) of the tokens whose characters overlap ``span``."""
    pos = 0
    first, last = None, None
    for i, t in enumerate(token_texts):
        end = pos + len(t)
        if end > span[0] and pos < span[1]:
            first = i if first is None else first
            last = i
        pos = end
    if first is None:
        return (0, 0)
    return (first, last + 1)


def _agg(values: np.ndarray, prefix: str) -> dict[str, float]:
    if values.size == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_min": 0.0}
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_min": float(values.min())}


PROMPT_FEATURES = ("prompt_nll", "prompt_tokens_log", "prompt_numbers", "prompt_max_digits", "expects_number", "expects_yesno")
SPAN_FEATURES = (
    "ans_found", "ans_lp_mean", "ans_lp_min", "ans_ent_mean", "ans_margin_min", "ans_margin_mean", "ans_tokens",
    "ans_first_lp", "ans_offset_log",
)
FEATURES = (
    "lp_mean", "lp_min", "ent_mean", "ent_max", "margin_mean", "margin_min", "first_lp", "first_margin", "first_ent",
    "tail_lp_mean", "eos_lp", "finish_eos", "finish_length", "tokens_log",
    *SPAN_FEATURES,
    *PROMPT_FEATURES,
)


def feature_vector(s: Signals) -> dict[str, float]:
    """All features of one answer, by name (see :data:`FEATURES`)."""
    lp = np.asarray(s.logprobs, dtype=float)
    ent = np.asarray(s.entropies, dtype=float)
    mar = np.asarray(s.margins, dtype=float)
    n = lp.size
    # the model ended its answer: with its eos token, or with a stop string the caller set (a daemon client's
    # "stop"), whose last token is no more part of the answer than an eos is; only "length" is a cut-off answer
    eos = s.finish_reason in ("eos", "stop")
    body = slice(0, n - 1 if eos and n > 1 else n)  # the eos token is not part of the answer text
    f: dict[str, float] = {}
    f.update(_agg(lp[body], "lp"))
    f["ent_mean"] = float(ent[body].mean()) if n else 0.0
    f["ent_max"] = float(ent[body].max()) if n else 0.0
    f.update(_agg(mar[body], "margin"))
    f["first_lp"] = float(lp[0]) if n else 0.0
    f["first_margin"] = float(mar[0]) if n else 0.0
    f["first_ent"] = float(ent[0]) if n else 0.0
    tail = lp[body][-4:]
    f["tail_lp_mean"] = float(tail.mean()) if tail.size else 0.0
    f["eos_lp"] = float(lp[-1]) if eos and n else -10.0
    f["finish_eos"] = 1.0 if eos else 0.0
    f["finish_length"] = 1.0 if s.finish_reason == "length" else 0.0
    f["tokens_log"] = math.log1p(n)

    kind = expected_answer_type(s.prompt)
    span = answer_span(s.text, kind)
    if span is not None:
        # a SentencePiece model's first token reads " The" while the answer's text, decoded, starts "The": the
        # tokens' characters run one ahead of the text's, and the span read the token before the answer's last one
        lead = 1 if s.token_texts and s.token_texts[0][:1] == " " and s.text[:1] != " " else 0
        i, j = _token_range(s.token_texts, (span[0] + lead, span[1] + lead))
    else:
        i = j = 0
    if j > i:
        a_lp, a_ent, a_mar = lp[i:j], ent[i:j], mar[i:j]
        f["ans_found"] = 1.0
        f["ans_lp_mean"], f["ans_lp_min"] = float(a_lp.mean()), float(a_lp.min())
        f["ans_ent_mean"] = float(a_ent.mean())
        f["ans_margin_min"], f["ans_margin_mean"] = float(a_mar.min()), float(a_mar.mean())
        f["ans_tokens"] = float(j - i)
        f["ans_first_lp"] = float(a_lp[0])
        f["ans_offset_log"] = math.log1p(span[0] if span else 0)
    else:
        # no answer of the expected form: fall back to whole-reply values, flagged by ans_found = 0
        f.update({"ans_found": 0.0, "ans_lp_mean": f["lp_mean"], "ans_lp_min": f["lp_min"], "ans_ent_mean": f["ent_mean"],
                  "ans_margin_min": f["margin_min"], "ans_margin_mean": f["margin_mean"], "ans_tokens": 0.0,
                  "ans_first_lp": f["first_lp"], "ans_offset_log": math.log1p(len(s.text))})

    numbers = _NUM.findall(s.prompt)
    f["prompt_nll"] = float(s.prompt_nll) if s.prompt_nll is not None else 0.0
    f["prompt_tokens_log"] = math.log1p(s.prompt_tokens)
    f["prompt_numbers"] = float(len(numbers))
    f["prompt_max_digits"] = float(max((len(x.replace(".", "")) for x in numbers), default=0))
    f["expects_number"] = 1.0 if kind == "number" else 0.0
    f["expects_yesno"] = 1.0 if kind == "yesno" else 0.0
    return f
