"""Self-verification: ask the model whether its own answer is right and read P(yes) (as AutoMix does)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["SELFCHECK_QUESTION", "yes_probability", "selfcheck_messages"]

SELFCHECK_QUESTION = "Is your answer above correct? Reply with just yes or no."
_YES = ("yes", "Yes", " yes", " Yes", "YES")
_NO = ("no", "No", " no", " No", "NO")


def selfcheck_messages(messages: Sequence[Mapping[str, Any]], answer: str) -> list[dict[str, Any]]:
    return [*(dict(m) for m in messages), {"role": "assistant", "content": answer}, {"role": "user", "content": SELFCHECK_QUESTION}]


def yes_probability(engine: Any, messages: Sequence[Mapping[str, Any]]) -> float:
    """P(yes) / (P(yes) + P(no)) for the first token of the model's reply to ``messages``.

    The question and the answer go after the conversation, so a conversation that
    filled the context window has no room for them: the self-check then reads the
    conversation's end only, rather than failing a request whose answer is already made.
    """
    lp = engine.next_token_logprobs(messages=messages, truncate=True)

    def mass(words: Sequence[str]) -> float:
        ids = {engine.tokenizer.encode(w, add_special_tokens=False).ids[0] for w in words}
        return float(np.logaddexp.reduce([lp[i] for i in ids]))

    yes, no = mass(_YES), mass(_NO)
    return float(1.0 / (1.0 + np.exp(no - yes)))
