"""Value types of the task suites: an item to ask and the score of one reply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TaskItem", "Score", "ANSWER_TYPES"]

# what kind of short answer an item expects; built-in items carry it in features["answer_type"]
ANSWER_TYPES = ("number", "yesno", "text")


@dataclass(frozen=True)
class TaskItem:
    """One question with its accepted answers.

    ``messages``: the chat to send (OpenAI shape); ``answers``: every accepted
    answer (compared by ``scorer`` after extraction); ``features``: small,
    prompt-derivable facts about the item (difficulty 1-5, answer type, operand
    digits, ...) for confidence estimators and pre-routers. ``split`` is ``"dev"``
    or ``"test"``.
    """

    id: str
    family: str
    messages: tuple[Mapping[str, str], ...]
    answers: tuple[str, ...]
    scorer: str
    features: Mapping[str, Any] = field(default_factory=dict)
    split: str = ""

    @property
    def prompt(self) -> str:
        """Text of the last user message (what a pre-router or privacy filter looks at)."""
        for msg in reversed(self.messages):
            if msg.get("role") == "user":
                return str(msg.get("content", ""))
        return ""

    def to_dict(self) -> dict[str, Any]:
        """The JSONL shape :func:`~edge_runtime.tasks.load_suite` reads back."""
        return {
            "id": self.id,
            "family": self.family,
            "messages": [dict(m) for m in self.messages],
            "answers": list(self.answers),
            "scorer": self.scorer,
            "features": dict(self.features),
            "split": self.split,
        }


@dataclass(frozen=True)
class Score:
    """Result of scoring one reply. ``parse_error`` says why no answer could be extracted
    (the reply then counts as wrong); ``extracted`` is the answer read from the reply."""

    correct: bool
    extracted: str | None
    parse_error: str | None = None
