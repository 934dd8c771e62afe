"""Turning generated token ids into text as they arrive.

Byte-level tokenizers split one UTF-8 character over several tokens; decoding
a prefix then ends in U+FFFD. :class:`IncrementalDecoder` only releases text
once the characters are complete, and records which token each character's last
byte came from. :class:`StopMatcher` holds back text that might be the beginning
of a stop string, so a stream never shows text that a later token turns into a stop.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDecoder", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Text of pushed tokens, released a whole character at a time.

    ``complete[i]`` is how many characters of the text (all that push and flush return, in order) the first
    ``i + 1`` tokens hold whole: a character counts at the token that holds its last byte, which is not always the
    token whose push releases it. A token holding a space and the first bytes of "お" gives nothing until the next
    token completes the character, then both come out; the space is still the earlier token's.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context (leading-space rules)
        self._read = 0  # ids before this have been released as text
        self._released = 0  # characters released so far
        self.complete: list[int] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add a token; return newly completed text (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            self._released += len(after) - len(before)
            self.complete.append(self._released)
            return after[len(before):]
        # held back: what precedes the U+FFFD standing in for the incomplete character is whole already
        whole = len(after) - len(before) - after.endswith(_REPLACEMENT)
        self.complete.append(max(self.complete[-1] if self.complete else 0, self._released + whole))
        return ""

    def flush(self) -> str:
        """Release whatever is left at the end (an incomplete character stays as U+FFFD, the last token's)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        if len(after) <= len(before):
            return ""
        self._released += len(after) - len(before)
        self.complete[-1] = self._released
        return after[len(before):]

    def tokens_holding(self, chars: int) -> int:
        """How many of the first tokens hold the first ``chars`` characters of the text (0 for none)."""
        return min(bisect.bisect_left(self.complete, chars) + 1, len(self.complete)) if chars > 0 else 0


class StopMatcher:
    """Finds stop strings in streamed text and holds back possible partial matches."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        # text already shown never ends with the start of a stop string, so a match lies in buf
        buf = self._pending + text
        hit = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self._pending = ""
            return buf[:hit], True
        keep = 0
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        safe, self._pending = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
        return safe, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
