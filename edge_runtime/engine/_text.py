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
        self.cut = 0  # how many characters at the end of flush's text stand for an incomplete character

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self._skip)

    def _cut_chars(self, text: str) -> int:
        """How many characters at the end of ``text`` (the held tokens' window) stand for a character whose bytes
        have not completed yet (0: none). A byte-level vocabulary decodes the incomplete bytes as one U+FFFD;
        SentencePiece's byte fallback (Llama 2, Mistral: a token "<0xE3>" per byte) as one U+FFFD per byte."""
        if not text.endswith(_REPLACEMENT):
            return 0
        if self._token_bytes is None:
            return 1
        pieces: list[tuple[int, bytes]] = []  # the held tokens the text shows: their index and bytes
        for k in range(self._read, len(self._ids)):
            token_id = self._ids[k]
            if self._skip and not self._tok.decode([token_id], skip_special_tokens=True):
                continue  # a special token the text leaves out: the bytes either side of it meet
            piece = self._token_bytes(token_id)
            if piece is None:  # a token of unknown bytes: as before, the U+FFFD is taken for a cut character
                return 1
            pieces.append((k, bytes(piece)))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(b"".join(piece for _, piece in pieces), final=False)
        pending = len(decoder.getstate()[0])  # bytes left over: the start of a character still to come
        if not pending:
            return 0
        # the last tokens, back to the first holding a pending byte: when they hold nothing else, the text without
        # them says how many characters stand for those bytes. Counted as one, a byte-fallback character of three
        # bytes was two characters "whole" before it was, and text_tokens stopped short of its last bytes; and a
        # byte-fallback decoder turns the whole run of byte tokens it ends into U+FFFDs, the window's earlier
        # character included ("お" then the byte E3: four), which are not whole characters either
        held, start = 0, len(self._ids)
        for start, piece in reversed(pieces):
            held += len(piece)
            if held >= pending:
                break
        if held != pending:  # a token holding whole characters too (byte-level b" \xe3\x81"): one U+FFFD
            return 1
        return max(len(text) - len(self._decode(self._ids[self._prefix:start])), 1)

    def push(self, token_id: int) -> str:
        """Add a token; return newly completed text (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        cut = self._cut_chars(after)
        if len(after) > len(before) and not cut:
            self._prefix, self._read = self._read, len(self._ids)
            self._released += len(after) - len(before)
            self.complete.append(self._released)
            return after[len(before):]
        # held back: what precedes the U+FFFD(s) standing in for the incomplete character is whole already
        whole = len(after) - len(before) - cut
        self.complete.append(max(self.complete[-1] if self.complete else 0, self._released + whole))
        return ""

    def flush(self) -> str:
        """Release whatever is left at the end (an incomplete character stays as U+FFFD, one per byte with a byte
        fallback, the last token's; ``cut`` then says how many characters of the text stand for it)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self.cut = self._cut_chars(after)
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
