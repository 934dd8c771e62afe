"""Turning generated token ids into text as they arrive.

Byte-level tokenizers split one UTF-8 character over several tokens; decoding
a prefix then ends in U+FFFD. :class:`IncrementalDecoder` only releases text
once the characters are complete. :class:`StopMatcher` holds back text that
might be the beginning of a stop string, so a stream never shows text that a
later token turns into a stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDecoder", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context (leading-space rules)
        self._read = 0  # ids before this have been released as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add a token; return newly completed text (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Release whatever is left at the end (an incomplete character stays as U+FFFD)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):] if len(after) > len(before) else ""


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
