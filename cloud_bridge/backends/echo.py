"""A model-free backend: fixed or echoed words, one per token, at a chosen pace.

It ships with the bridge (like httpx's MockTransport ships with httpx) so the
whole service runs in tests, demos and benchmarks without a model, and it
records every generation so a test can see when and why one ended: that is
how "a cancelled call stops the backend" is checked.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from edge_runtime.errors import BackendError

from .._settings import EchoModelSettings
from ._base import BackendChunk, BackendRequest, BackendResult, CancelToken, fit_to_window

__all__ = ["EchoBackend", "GenerationRecord"]

_WORD_RE = re.compile(r"\s*\S+")


@dataclass(frozen=True)
class GenerationRecord:
    request: BackendRequest
    started_s: float  # time.monotonic()
    ended_s: float
    completion_tokens: int
    finish_reason: str


class EchoBackend:
    kind = "echo"

    def __init__(
        self,
        settings: EchoModelSettings | None = None,
        *,
        fail_after_tokens: int | None = None,
        failure: Exception | None = None,
    ) -> None:
        self.settings = settings or EchoModelSettings()
        self.model = self.settings.model
        self.revision = self.bundle_revision = ""
        self.context_length = self.settings.context_length
        # failure injection for tests: raise ``failure`` once this many tokens were made
        self.fail_after_tokens = fail_after_tokens
        self.failure = failure
        self.generations: list[GenerationRecord] = []
        self._cond = threading.Condition()
        self.closed = False

    @staticmethod
    def count_words(text: str) -> int:
        return len(_WORD_RE.findall(text))

    def _answer(self, request: BackendRequest) -> str:
        if self.settings.reply:
            return self.settings.reply
        users = [m["content"] for m in request.messages if m["role"] == "user"]
        return users[-1] if users else ""

    def stream(self, request: BackendRequest, cancel: CancelToken) -> Iterator[BackendChunk]:
        prompt_tokens = sum(self.count_words(m["content"]) for m in request.messages)
        request = fit_to_window(request, prompt_tokens, self.context_length)
        params = request.params
        words = _WORD_RE.findall(self._answer(request))
        started_s = time.monotonic()
        delay_s = self.settings.token_delay_ms / 1000.0
        text, count, finish, ttft_ms = "", 0, "eos", None
        try:
            for word in words:
                if count >= params.max_new_tokens:
                    finish = "length"
                    break
                if cancel.wait(delay_s) if delay_s > 0 else cancel():
                    finish = "cancelled"
                    break
                if self.fail_after_tokens is not None and count >= self.fail_after_tokens:
                    raise self.failure or BackendError("echo backend: injected failure", reason="INJECTED_FAILURE")
                count += 1
                stop_at = min((i for s in params.stop if (i := (text + word).find(s)) >= 0), default=-1)
                if stop_at >= 0:
                    piece = (text + word)[:stop_at][len(text) :]
                    text += piece
                    if ttft_ms is None:
                        ttft_ms = (time.monotonic() - started_s) * 1000.0
                    yield BackendChunk(piece, 1)
                    finish = "stop"
                    break
                text += word
                if ttft_ms is None:
                    ttft_ms = (time.monotonic() - started_s) * 1000.0
                yield BackendChunk(word, 1)
            else:
                if not words and cancel():
                    finish = "cancelled"
        except GeneratorExit:  # the caller stopped reading
            finish = "closed"
            raise
        except Exception:
            finish = "error"
            raise
        finally:
            self._record(GenerationRecord(request, started_s, time.monotonic(), count, finish))
        yield BackendChunk("", 0, BackendResult(text, finish, prompt_tokens, count, self.model, ttft_ms))

    def generate(self, request: BackendRequest, cancel: CancelToken) -> BackendResult:
        for chunk in self.stream(request, cancel):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("echo stream ended without a result")  # pragma: no cover

    def _record(self, record: GenerationRecord) -> None:
        with self._cond:
            self.generations.append(record)
            self._cond.notify_all()

    def wait_for_generations(self, count: int, timeout_s: float = 5.0) -> list[GenerationRecord]:
        """Block until ``count`` generations have ended (or the timeout passes); return them all."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.generations) >= count, timeout_s)
            return list(self.generations)

    def close(self) -> None:
        self.closed = True
