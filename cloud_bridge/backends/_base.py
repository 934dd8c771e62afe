"""The backend seam: what the bridge asks of a model, whatever runs it.

A backend turns a validated :class:`BackendRequest` into a :class:`BackendResult`
(or a stream of :class:`BackendChunk`), and must stop promptly once its
:class:`CancelToken` fires: that is how a cancelled or expired gRPC call stops
the generation behind it. Failures are raised as
:class:`~edge_runtime.errors.BackendError` (with the gRPC code to answer) or
:class:`~edge_runtime.errors.InvalidRequestError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from edge_runtime.cloud import Escalation
from edge_runtime.engine.types import SamplingParams
from edge_runtime.errors import BackendError, ContextLengthError

__all__ = ["CancelToken", "BackendRequest", "BackendResult", "BackendChunk", "Backend", "estimated_tokens",
           "context_length_error", "fit_to_window", "UnusableAnswerError"]


def estimated_tokens(text: str) -> int:
    """Tokens of a text nobody counted (an upstream that sent no usage, a call cut before it did): ~4 characters a
    token, rounded up. Counting none would make such calls free for the device's quota and the bill."""
    return -(-len(text) // 4)


def context_length_error(prompt_tokens: int, max_new_tokens: int, context_length: int) -> ContextLengthError:
    """The error for a prompt that, with ``max_new_tokens``, overflows the model's window, naming what the caller
    must change, as the daemon does: ``messages`` when the prompt leaves no room for even one new token (no
    max_new_tokens can help), else ``max_new_tokens``. Every backend that knows its window answers alike."""
    if prompt_tokens >= context_length:
        return ContextLengthError(
            f"the prompt has {prompt_tokens} tokens and leaves no room for an answer in the context window of "
            f"{context_length} tokens (shorten the prompt)",
            field="messages",
        )
    return ContextLengthError(
        f"the prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: together they exceed the "
        f"context window of {context_length} tokens (at most {context_length - prompt_tokens} new tokens fit)",
        field="max_new_tokens",
    )


class UnusableAnswerError(BackendError):
    """The model answered, and its upstream billed the answer, but the bridge cannot use it (its choices malformed,
    a finish reason that is no string, a usage no call can have, ...).

    The device gets the error; the bridge bills ``prompt_tokens`` and ``completion_tokens`` all the same, as it bills
    a stream that fails after its first words: the upstream's own counts where they were usable, else estimates
    (``prompt_estimated``: the prompt's are).
    """

    def __init__(self, message: str, *, prompt_tokens: int, completion_tokens: int, prompt_estimated: bool,
                 reason: str = "UPSTREAM_BAD_RESPONSE") -> None:
        super().__init__(message, reason=reason)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.prompt_estimated = prompt_estimated

    def with_message(self, message: str) -> UnusableAnswerError:
        """The same error, bill included, saying ``message`` (the API key cut out of it, say)."""
        return UnusableAnswerError(message, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                                   prompt_estimated=self.prompt_estimated, reason=self.reason)


_EXPIRY_SLACK_S = 0.005


class CancelToken:
    """Set when the call behind a generation is cancelled, or once ``deadline_s`` (monotonic) passes.

    Calling the token returns whether to stop, so it can be handed to the engine
    as its ``cancel`` callable.
    """

    def __init__(self, deadline_s: float | None = None) -> None:
        self.deadline_s = deadline_s
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def __call__(self) -> bool:
        if self._event.is_set():
            return True
        if self.deadline_s is not None and time.monotonic() >= self.deadline_s:
            self.cancel()
            return True
        return False

    @property
    def cancelled(self) -> bool:
        return self()

    @property
    def expired(self) -> bool:
        """The deadline has passed (or is a moment away: the caller's clock and a cancel from it are not ours)."""
        return self.deadline_s is not None and time.monotonic() >= self.deadline_s - _EXPIRY_SLACK_S

    def time_remaining_s(self) -> float | None:
        return None if self.deadline_s is None else max(0.0, self.deadline_s - time.monotonic())

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` (less if the deadline comes first); True if cancelled."""
        remaining = self.time_remaining_s()
        if remaining is not None:
            timeout_s = min(timeout_s, remaining)
        self._event.wait(max(0.0, timeout_s))
        return self()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on cancellation (at once if already cancelled), e.g. to close a socket."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


@dataclass(frozen=True)
class BackendRequest:
    request_id: str
    messages: list[dict[str, str]]
    params: SamplingParams
    escalation: Escalation | None = None
    # the caller set no max_new_tokens: ``params`` has the bridge's default, which a backend that knows its window
    # cuts to what the prompt leaves (see :func:`fit_to_window`)
    default_length: bool = False


def fit_to_window(request: BackendRequest, prompt_tokens: int, context_length: int) -> BackendRequest:
    """``request`` as a backend with a window of ``context_length`` tokens runs it, or :func:`context_length_error`.

    A length the caller set is theirs: too long is an error naming it. The bridge's default is cut to what the
    prompt leaves, as the daemon (and OpenAI's API) do for a request without ``max_tokens``: a device's long
    escalation was refused for a length it never asked for.
    """
    if prompt_tokens + request.params.max_new_tokens <= context_length:
        return request
    if request.default_length and prompt_tokens < context_length:
        return replace(request, params=replace(request.params, max_new_tokens=context_length - prompt_tokens))
    raise context_length_error(prompt_tokens, request.params.max_new_tokens, context_length)


@dataclass(frozen=True)
class BackendResult:
    text: str
    finish_reason: str  # stop | eos | length | cancelled | content_filter
    prompt_tokens: int
    completion_tokens: int
    model: str
    ttft_ms: float | None = None


@dataclass(frozen=True)
class BackendChunk:
    text: str
    token_count: int = 0
    result: BackendResult | None = field(default=None)


@runtime_checkable
class Backend(Protocol):
    kind: str  # "onnx", "openai", "echo"
    model: str  # the name reported as the answering model
    context_length: int  # 0 when unknown
    revision: str  # what identifies the weights behind ``model`` ("" when the backend cannot know)
    bundle_revision: str  # the weights and the settings that make the answers (a bundle's hash), "" when unknown

    def generate(self, request: BackendRequest, cancel: CancelToken) -> BackendResult: ...

    def stream(self, request: BackendRequest, cancel: CancelToken) -> Iterator[BackendChunk]:
        """Text as it is made; the last chunk has ``result`` set."""
        ...

    def close(self) -> None: ...
