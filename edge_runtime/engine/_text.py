"""Turning generated token ids into text as they arrive.

Byte-level tokenizers split one UTF-8 character over several tokens; decoding
a prefix then ends in U+FFFD. :class:`IncrementalDecoder` only releases text
once the characters are complete, and records which token each character's last
byte came from. :class:`StopMatcher` holds back text that might be the beginning
of a stop string, so a stream never shows text that a later token turns into a stop.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Callable, Sequence
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

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True,
                 token_bytes: Callable[[int], Sequence[int] | None] | None = None) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # a token's bytes (None: not known): tells a U+FFFD standing for a character cut short from one the model
        # wrote (SmolLM2 and Qwen have tokens for it); without them every trailing U+FFFD is taken for a cut one
        self._token_bytes = token_bytes
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context (leading-space rules)
        self._read = 0  # ids before this have been released as text
        self._released = 0  # characters released so far
        self.complete: list[int] = []
        self.cut = False  # whether the text flush released ends in a U+FFFD standing for an incomplete character

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip)

    def _ends_cut(self, text: str) -> bool:
        """Whether ``text`` (the held tokens' window) ends in a character its bytes have not completed yet."""
        if not text.endswith(_REPLACEMENT):
            return False
        if self._token_bytes is None:
            return True
        raw = bytearray()
        for token_id in self._ids[self._read:]:
            if self._skip and not self._tok.decode([token_id], skip_special_tokens=True):
                continue  # a special token the text leaves out: the bytes either side of it meet
            piece = self._token_bytes(token_id)
            if piece is None:  # a token of unknown bytes: as before, the U+FFFD is taken for a cut character
                return True
            raw += bytes(piece)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(raw), final=False)
        return bool(decoder.getstate()[0])  # bytes left over: the start of a character still to come

    def push(self, token_id: int) -> str:
        """Add a token; return newly completed text (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        cut = self._ends_cut(after)
        if len(after) > len(before) and not cut:
            self._prefix, self._read = self._read, len(self._ids)
            self._released += len(after) - len(before)
            self.complete.append(self._released)
            return after[len(before):]
        # held back: what precedes the U+FFFD standing in for the incomplete character is whole already
        whole = len(after) - len(before) - cut
        self.complete.append(max(self.complete[-1] if self.complete else 0, self._released + whole))
        return ""

    def flush(self) -> str:
        """Release whatever is left at the end (an incomplete character stays as U+FFFD, the last token's; ``cut``
        then says so)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self.cut = self._ends_cut(after)
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
