"""Value types of the generation engine: request parameters, per-token signals, results.

These are plain dataclasses with no onnxruntime dependency, so the bridge,
the hybrid runtime and the daemon can use them without loading a model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import EdgeRuntimeError, InvalidRequestError

__all__ = [
    "short_repr",
    "well_formed",
    "has_half_character",
    "ProviderSpec",
    "provider_specs",
    "FinishReason",
    "Message",
    "SamplingParams",
    "TopLogprob",
    "TokenInfo",
    "Usage",
    "Timings",
    "EnergyReport",
    "GenerationResult",
    "StreamChunk",
    "validate_messages",
    "ROLES",
    "is_plain_request_id",
    "check_api_temperature",
]

FinishReason = Literal["stop", "eos", "length", "cancelled"]
ROLES = ("system", "user", "assistant", "tool")

# A chat message as apps send it: {"role": "user", "content": "..."}.
Message = Mapping[str, Any]

# Hard ceiling for max_new_tokens whatever the model: protects a long-lived process
# from a request that asks for a billion tokens.
MAX_NEW_TOKENS_LIMIT = 1 << 16
# Seeds travel to the cloud bridge as int64 (proto/edgecloud/v1/bridge.proto): one range everywhere.
MAX_SEED = (1 << 63) - 1
# OpenAI's sampling range, which the daemon's transports and the bridge take alike (the engine samples at any)
MAX_API_TEMPERATURE = 2.0

# a request id of these characters is one word without `=`, quotes or a newline: safe in a header, in gRPC
# metadata and at the head of a key=value log line
_PLAIN_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_plain_request_id(value: str) -> bool:
    return _PLAIN_REQUEST_ID.fullmatch(value) is not None


def check_api_temperature(value: Any) -> None:
    """Refuse a temperature above :data:`MAX_API_TEMPERATURE` (a negative one SamplingParams refuses itself)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_API_TEMPERATURE:
        raise InvalidRequestError(f"must be between 0 and {MAX_API_TEMPERATURE:g}, got {value}", field="temperature")


def validate_messages(messages: Any, *, field_name: str = "messages") -> list[dict[str, str]]:
    """Check a chat message list; return normalised copies. Errors name the offending field."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise InvalidRequestError("must be a list of {role, content} objects", field=field_name)
    if not messages:
        raise InvalidRequestError("must contain at least one message", field=field_name)
    out = []
    for i, msg in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidRequestError("must be an object with role and content", field=where)
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name for system instructions, in files written for its API too
            role = "system"
        if role not in ROLES:
            # "developer" is accepted (read as system), so it is named too
            raise InvalidRequestError(f"unknown role {short_repr(role, 40)} (expected one of system, developer, "
                                      f"{', '.join(r for r in ROLES if r != 'system')})", field=f"{where}.role")
        out.append({"role": role, "content": message_text(msg.get("content"), f"{where}.content")})
    return out


def message_text(content: Any, field_name: str) -> str:
    """A message's text: a string, or OpenAI content parts joined (text only: a small language model reads no
    images). Errors name ``field_name``."""
    if isinstance(content, list):
        content = "".join(_text_part(part, f"{field_name}[{j}]") for j, part in enumerate(content))
    if not isinstance(content, str):
        raise InvalidRequestError("must be a string", field=field_name)
    _check_text(content, field_name)
    return content


# the end of a context-length error's advice; a caller that cannot ask for truncation (the daemon) cuts it
TRUNCATION_HINT = ", or set truncate_prompt to keep the prompt's end"


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut short: a client's value travels back in headers and logs."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def log_text(value: Any, limit: int = 500) -> str:
    """``str(value)`` for one log line: control characters escaped (a newline in a client's or an upstream's
    text would forge log lines), cut at ``limit``."""
    text = repr(str(value))[1:-1]
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def has_half_character(value: Any) -> bool:
    """Whether ``value`` (a string, or JSON's lists and objects of them, keys included) holds a UTF-16 surrogate
    (``"\\ud83d"`` in JSON: half an emoji), which UTF-8 cannot encode."""
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, Mapping):
        return any(has_half_character(k) or has_half_character(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_half_character(v) for v in value)
    return False


def well_formed(text: str) -> str:
    """``text`` with each unpaired UTF-16 surrogate as U+FFFD (a pair split in two escapes is joined), for text that
    goes back out: UTF-8 cannot encode half a character, and strict JSON parsers refuse its escape."""
    if not has_half_character(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _text_part(part: Any, field_name: str) -> str:
    """The text of an OpenAI content part; any other part is refused, not dropped (the answer would ignore it)."""
    if not isinstance(part, Mapping) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        raise InvalidRequestError(f"only text parts are supported, got {short_repr(kind, 40)}", field=field_name)
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidRequestError("must be a string", field=f"{field_name}.text")
    return text


def _check_text(text: str, field_name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates from a bad decoder
        raise InvalidRequestError(f"is not valid UTF-8 ({err.reason} at {err.start})", field=field_name) from err


# an onnxruntime execution provider: its name, or its name and its options
ProviderSpec = str | tuple[str, Mapping[str, str]]


def provider_specs(
    names: Sequence[str],
    options: Mapping[str, Any] | None = None,
    *,
    field: str = "provider_options",
    error: type[EdgeRuntimeError] = InvalidRequestError,
) -> list[ProviderSpec]:
    """onnxruntime's provider list: ``names`` in order, each with its ``options`` (values as strings).

    Options for a provider that is not in ``names`` raise ``error`` instead of being
    dropped: a misspelt provider name would otherwise run without the options meant for it.
    """
    options = options or {}
    for name, opts in options.items():
        if name not in names:
            raise error(f"options given for {name!r}, which is not in the provider list {list(names)}", field=f"{field}.{name}")
        if not isinstance(opts, Mapping):
            raise error(f"expected a table of option = value, got {opts!r}", field=f"{field}.{name}")
    return [(n, {str(k): str(v) for k, v in options[n].items()}) if n in options else n for n in names]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to generate; each field is checked here (``InvalidRequestError`` naming it).

    - ``max_new_tokens``: 1 to 65,536 (default 256); the prompt plus it must fit the model's context window.
    - ``temperature``: >= 0; 0 (the default) means greedy. ``top_p`` in (0, 1]; ``top_k`` >= 0, 0 meaning no cut.
    - ``seed``: 0 to 2**63 - 1, or None; a seeded sampled request repeats its answer.
    - ``stop``: up to 16 non-empty strings; the answer ends before the first one (not included).
    - ``top_logprobs``: 0 to 20 alternatives per token, in OpenAI's shape.
    - ``truncate_prompt``: when the prompt does not fit, drop its oldest part instead of raising.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    # when the prompt does not fit, drop its oldest tokens instead of raising (opt-in)
    truncate_prompt: bool = False

    def __post_init__(self) -> None:
        if self.stop is None:  # OpenAI clients send null for "no stop strings"
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (Mapping, Set)):  # tuple() would quietly take a dict's keys
            raise InvalidRequestError(f"must be a string or a list of strings, got {type(self.stop).__name__}", field="stop")
        elif not isinstance(self.stop, tuple):
            try:
                object.__setattr__(self, "stop", tuple(self.stop))
            except TypeError as err:
                raise InvalidRequestError(f"must be a string or a list of strings, got {type(self.stop).__name__}", field="stop") from err
        # numpy scalars and the like are fine; bools and strings are not numbers here
        for name in ("max_new_tokens", "top_k", "top_logprobs", "seed"):
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InvalidRequestError(f"must be an integer, got {short_repr(value)}", field=name)
            object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidRequestError(f"must be a number, got {short_repr(value)}", field=name)
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError as err:  # an integer past a float's range (JSON allows 10**400)
                raise InvalidRequestError(f"must be a finite number, got {short_repr(value)}", field=name) from err
        if not isinstance(self.truncate_prompt, bool):
            raise InvalidRequestError(f"must be true or false, got {short_repr(self.truncate_prompt)}", field="truncate_prompt")
        self.validate()

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidRequestError(f"must be positive, got {short_repr(self.max_new_tokens)}", field="max_new_tokens")
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT:
            raise InvalidRequestError(f"must be at most {MAX_NEW_TOKENS_LIMIT}, got {short_repr(self.max_new_tokens)}", field="max_new_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"must be a finite number >= 0, got {self.temperature}", field="temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"must be an integer >= 0, got {short_repr(self.top_k)}", field="top_k")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError(f"must be an integer in [0, 2**63 - 1], got {short_repr(self.seed)}", field="seed")
        if not (0 <= self.top_logprobs <= 20):
            raise InvalidRequestError(f"must be an integer in [0, 20], got {short_repr(self.top_logprobs)}", field="top_logprobs")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop strings must be non-empty strings", field=f"stop[{i}]")
            _check_text(s, f"stop[{i}]")
        if len(self.stop) > 16:
            raise InvalidRequestError("at most 16 stop strings", field="stop")

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TopLogprob:
    """One alternative token, in OpenAI's ``top_logprobs`` shape."""

    id: int
    token: str
    logprob: float
    bytes: list[int] | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}


@dataclass(frozen=True)
class TokenInfo:
    """A generated token and the signals of the model's distribution at its position.

    Every signal reads the model's own distribution (temperature 1, nothing cut by top_k or top_p), whatever the
    request sampled with: the same token gets the same figures greedy or sampled, which is what the confidence
    estimators were fitted on. A sampled answer's logprobs therefore do not sum to the log-probability of drawing it.

    ``logprob``: log-probability of the chosen token (natural log).
    ``entropy``: entropy of the full next-token distribution, in nats.
    ``margin``: top-1 minus top-2 probability (0..1).
    """

    id: int
    text: str
    logprob: float
    entropy: float
    margin: float
    top_logprobs: tuple[TopLogprob, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "text": self.text, "logprob": self.logprob, "entropy": self.entropy, "margin": self.margin}
        if self.top_logprobs is not None:
            d["top_logprobs"] = [t.to_openai() for t in self.top_logprobs]
        return d


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation: the prompt's, the answer's (``completion_tokens``, an eos and a cut stop
    string included), the prompt's reused from a cache, and prompt lookup's drafts and how many were kept."""

    prompt_tokens: int
    completion_tokens: int
    # prompt tokens whose KV state was reused from a previous turn (not prefilled again)
    cached_prompt_tokens: int = 0
    # tokens guessed by prompt lookup and checked in a decode step, and how many of them the model chose
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Milliseconds: the engine's model load (``load_ms``, once per engine), the prompt's prefill, the decode of the
    tokens after the first, and the time to the first token (``ttft_ms``, from the request: waiting for a KV cache
    or for the chat session's previous turn included, which ``prefill_ms`` is not)."""

    load_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float

    def decode_tokens_per_s(self, completion_tokens: int) -> float:
        # the first token comes out of prefill; decode covers the rest
        steps = max(completion_tokens - 1, 0)
        return steps / (self.decode_ms / 1000.0) if self.decode_ms > 0 and steps else 0.0


@dataclass(frozen=True)
class EnergyReport:
    """Energy spent by one generation. ``estimated`` is True unless a hardware counter measured it."""

    joules: float
    source: str
    estimated: bool
    seconds: float
    process_joules: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GenerationResult:
    """One answer: ``text`` (stop string cut), ``token_ids`` and ``tokens`` (each with its signals: see TokenInfo),
    ``finish_reason`` (``stop``, ``eos``, ``length``, ``cancelled``), ``usage``, ``timings``, ``energy`` (None
    without a meter), ``prompt_nll`` (mean negative log-likelihood of the prompt's tokens, natural log, when asked
    for), ``model`` (the bundle's name) and ``text_tokens`` (``tokens[:text_tokens]`` made the text; None: all)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    tokens: list[TokenInfo]
    usage: Usage
    timings: Timings
    energy: EnergyReport | None = None
    # mean negative log-likelihood per prompt token under the model (natural log), when requested
    prompt_nll: float | None = None
    model: str = ""
    # tokens[:text_tokens] made ``text`` (each character counted at the token holding its last byte): the last of
    # them may also hold the start of a stop string cut from the text; the rest are an eos or lie inside that stop
    # string (generated and counted in usage all the same). None: all of them.
    text_tokens: int | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return self.timings.decode_tokens_per_s(self.usage.completion_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "tokens": [t.to_dict() for t in self.tokens],
            "text_tokens": len(self.tokens) if self.text_tokens is None else self.text_tokens,
            "usage": {"prompt_tokens": self.usage.prompt_tokens, "completion_tokens": self.usage.completion_tokens,
                      "cached_prompt_tokens": self.usage.cached_prompt_tokens, "draft_tokens": self.usage.draft_tokens,
                      "accepted_draft_tokens": self.usage.accepted_draft_tokens},
            "timings": {
                "load_ms": round(self.timings.load_ms, 3),
                "prefill_ms": round(self.timings.prefill_ms, 3),
                "decode_ms": round(self.timings.decode_ms, 3),
                "ttft_ms": round(self.timings.ttft_ms, 3),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            },
            "energy": self.energy.to_dict() if self.energy else None,
            "prompt_nll": self.prompt_nll,
            "model": self.model,
        }


@dataclass(frozen=True)
class StreamChunk:
    """One step of :meth:`Engine.stream`.

    ``text`` is the newly completed text (possibly empty while a UTF-8 character
    or a possible stop string is still pending); ``token`` the token generated at
    this step. The last chunk has ``result`` set and no token. ``tokens_shown``,
    on a chunk with text: how many of the generation's tokens hold the text shown
    so far, this chunk's included (None: every token so far). Text released
    after it was held may be only the first held tokens' (a stop string may yet
    cut the rest), so a consumer that pairs text with tokens counts this far.
    """

    text: str
    token: TokenInfo | None = None
    result: GenerationResult | None = field(default=None)
    tokens_shown: int | None = None
