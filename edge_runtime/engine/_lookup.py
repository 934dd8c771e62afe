"""Prompt-lookup drafts: guess the next tokens by finding the current ending earlier in the text.

Small models repeat their prompt and themselves (names, code identifiers, list
items, whole phrases). When the last few tokens occurred before, the tokens
that followed them then are a cheap guess for what follows now. The engine
feeds the guess to the model together with the next token in one multi-row
run and keeps the guessed tokens the model agrees with (see ``Engine.run``).
A decode step is bound by reading the weights, so a two-row step costs little
more than a one-row one (1.2x on a 2-core x86 VM): an accepted draft is a token
for a fifth of a step.

The index maps every n-gram (``min_ngram`` to ``max_ngram`` tokens) to the
position after its latest occurrence that already has a follower, and is
updated as tokens are appended: a draft is a dictionary lookup, not a scan of
the text, so its cost does not grow with the prompt.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PromptLookup", "PROMPT_LOOKUP_TOKENS", "SUGGESTED_PROMPT_LOOKUP_TOKENS", "MAX_PROMPT_LOOKUP_TOKENS"]

# Off by default: with int4/int8 a drafted step runs the multi-row kernels, which compute a row a
# little differently from a one-row step, so answers change at near-ties; the shipped estimator and
# the recorded evaluations were fitted on answers decoded without drafts.
PROMPT_LOOKUP_TOKENS = 0
# What to turn on: int4 SmolLM2, 2 threads, a step of 2, 3 or 4 rows cost 1.22x, 1.50x and 1.71x a
# 1-row step (benchmarks/lookup.py). Replaying the greedy answers of 72 chat and task-suite prompts
# with those costs, drafting 1-3 tokens by the longest 2- to 4-token match beat 1 or 2 tokens and
# 3-token-minimum matches; 4 to 8 tokens (steps past 4 rows extrapolated) came within 1% of it.
SUGGESTED_PROMPT_LOOKUP_TOKENS = 3
MAX_PROMPT_LOOKUP_TOKENS = 8  # each token appended indexes one n-gram per match length


class PromptLookup:
    """Draft tokens for a sequence by its longest ending n-gram seen before.

    A match of ``n`` tokens drafts up to ``n - 1`` tokens (capped by
    ``max_draft``): a longer match has a better chance of continuing the same
    way, and every drafted token costs a row of the verifying run. Matches are
    ``min_ngram`` to ``max_ngram`` tokens long (by default up to ``max_draft + 1``,
    the shortest match that can fill a whole draft).
    """

    def __init__(self, tokens: Iterable[int] = (), *, max_draft: int = 3, min_ngram: int = 2,
                 max_ngram: int | None = None) -> None:
        if max_draft < 1:
            raise ValueError("max_draft must be >= 1")
        max_ngram = max_draft + 1 if max_ngram is None else max_ngram
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_draft = max_draft
        self._sizes = range(max_ngram, min_ngram - 1, -1)  # longest match first
        self._seq: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self._seq)

    def extend(self, tokens: Iterable[int]) -> None:
        seq, after, sizes = self._seq, self._after, self._sizes
        for token in tokens:
            end = len(seq)
            # the n-grams ending at the current last token now have a follower: the new token
            for n in sizes:
                if end >= n:
                    after[tuple(seq[end - n:end])] = end
            seq.append(int(token))

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest earlier occurrence of the sequence's ending."""
        if limit < 1:
            return []
        seq = self._seq
        end = len(seq)
        for n in self._sizes:
            if end < n:
                continue
            start = self._after.get(tuple(seq[end - n:]))
            if start is not None:
                return seq[start:start + min(limit, self.max_draft, n - 1)]
        return []
