"""OpenAI chat-completions JSON in and out.

Accepted request fields: ``model`` (``auto``, ``local``, ``cloud``; default
``auto``), ``messages``, ``max_completion_tokens`` / ``max_tokens``,
``temperature`` (0-2; default: the runtime's, greedy), ``top_p``, ``seed``,
``stop``, ``logprobs``, ``top_logprobs`` (0-20), ``stream``,
``stream_options.include_usage``, ``n`` (1 only) and ``user``. A ``developer``
message (OpenAI's newer name for the instructions a ``system`` message gives) is
read as ``system``, the role chat templates know. A field that
would change what the answer must be and is not supported here (tools and
function calling, a ``response_format`` other than text, ``logit_bias``,
non-zero penalties, audio) is refused naming it, rather than answered as if it
had not been asked; OpenAI's metadata fields (``metadata``, ``store``, ...) are
type-checked and otherwise ignored; a known field with a bad value is refused
naming it.

Every completion carries OpenAI's fields plus extension objects: ``routing``
(route, p_correct, threshold, policy, reason, detail, cloud_error, draft),
``energy``, ``cost`` and ``latency``; ``model`` is the model that answered.
``usage`` counts every token processed for the request on both sides, split
in ``usage.local`` and ``usage.cloud``. A stream's chunks carry the requested
alias as ``model`` until the last one, which names the model that answered
and carries the extension objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..config import is_finite
from ..engine.types import MAX_SEED, TokenInfo, short_repr
from ..errors import InvalidRequestError
from ..hybrid import MODEL_ALIASES, HybridResult
from ._request import ChatRequest, build_chat_request, stop_list

__all__ = [
    "parse_chat_request",
    "completion_object",
    "chunk_object",
    "final_chunk_objects",
    "logprob_entry",
    "models_object",
    "extensions",
    "usage_object",
]

TokenBytes = Callable[[int], "list[int] | None"]


def _int(body: Mapping[str, Any], name: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"must be an integer, got {short_repr(value)}", field=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidRequestError(f"must be {bounds}, got {short_repr(value)}", field=name)
    return value


def _float(body: Mapping[str, Any], name: str, *, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
        raise InvalidRequestError(f"must be a number, got {short_repr(value)}", field=name)
    if value > hi or value < lo or (lo_open and value == lo):
        raise InvalidRequestError(f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", field=name)
    return float(value)



def _bool(body: Mapping[str, Any], name: str, *, field: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"must be true or false, got {short_repr(value)}", field=field or name)
    return value


# OpenAI fields whose value is honoured only when it asks for nothing (null, empty, zero, plain text)
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none", "auto"),  # "auto" with no tools asks for nothing
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
    "logit_bias": lambda v: not v or (isinstance(v, Mapping) and not any(v.values())),
    "presence_penalty": lambda v: v is None or _is_zero(v),
    "frequency_penalty": lambda v: v is None or _is_zero(v),
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "reasoning_effort": lambda v: v is None,  # no reasoning models here
    "web_search_options": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "moderation": lambda v: v is None,  # no moderation model here
}

# what this server reads, and OpenAI's metadata and hints that change no answer
_HANDLED = frozenset({
    "model", "messages", "n", "user", "max_completion_tokens", "max_tokens", "temperature", "top_p", "seed", "stop",
    "logprobs", "top_logprobs", "stream", "stream_options",
})
# (they are still type-checked as OpenAI does: a client's bug should not pass here and fail there)
_HARMLESS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "metadata": (lambda v: _is_metadata(v), "must be an object of at most 16 string values (keys up to 64 characters, "
                                            "values up to 512)"),
    "store": (lambda v: isinstance(v, bool), "must be true or false"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "must be true or false"),
    "service_tier": (lambda v: isinstance(v, str), "must be a string"),
    "prediction": (lambda v: isinstance(v, Mapping), "must be an object"),
    "prompt_cache_key": (lambda v: isinstance(v, str), "must be a string"),
    "prompt_cache_retention": (lambda v: isinstance(v, str), "must be a string"),
    "prompt_cache_options": (lambda v: isinstance(v, Mapping), "must be an object"),
    "safety_identifier": (lambda v: isinstance(v, str), "must be a string"),
}
# stream_options: usage on the last chunk; OpenAI's obfuscation padding changes nothing here
_STREAM_OPTIONS = frozenset({"include_usage", "include_obfuscation"})


def _is_zero(value: Any) -> bool:
    # false == 0 in Python, not in JSON: OpenAI refuses a boolean penalty
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0


def _is_metadata(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) <= 16
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                    for k, v in value.items()))


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, harmless in _UNSUPPORTED.items():
        if name in body and not harmless(body[name]):
            raise InvalidRequestError(f"is not supported by this server (got {short_repr(body[name])}); leave it out",
                                      field=name)
    for name, (valid, expected) in _HARMLESS.items():
        if body.get(name) is not None and not valid(body[name]):
            raise InvalidRequestError(f"{expected}, got {short_repr(body[name])}", field=name)
    # a misspelt field ("max_token") would otherwise be ignored, and the answer made without it (OpenAI refuses it too)
    for name in body:
        if name not in _HANDLED and name not in _HARMLESS and name not in _UNSUPPORTED:
            raise InvalidRequestError("unknown field for /v1/chat/completions", field=str(name)[:80])


# fields of a message object OpenAI defines: some change nothing here (type-checked), some ask for tool calling
# (refused when they ask for anything, as the request's own tools are). Other fields are ignored, as OpenAI's chat
# endpoint ignores them: a client that appends a returned message to its history sends what the message had.
_MESSAGE_HARMLESS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: v is None or isinstance(v, str),  # a participant's name: not shown to the model here
    "refusal": lambda v: v is None or isinstance(v, str),  # an earlier assistant refusal's text
    "annotations": lambda v: v is None or isinstance(v, list),  # an earlier answer's citations
}
_MESSAGE_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tool_calls": lambda v: not v, "function_call": lambda v: v is None, "tool_call_id": lambda v: v is None,
    "audio": lambda v: v is None,
}


def _check_message_fields(messages: Any) -> None:
    if not isinstance(messages, list):
        return  # validate_messages says what is wrong with it
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            continue
        for key, value in msg.items():
            field = f"messages[{i}].{str(key)[:80]}"
            if key in _MESSAGE_HARMLESS and not _MESSAGE_HARMLESS[key](value):
                raise InvalidRequestError(f"has the wrong type: {short_repr(value)}", field=field)
            if key in _MESSAGE_UNSUPPORTED and not _MESSAGE_UNSUPPORTED[key](value):
                raise InvalidRequestError(f"is not supported by this server (got {short_repr(value)}); leave it out",
                                          field=field)


def _openai_roles(messages: Any) -> Any:
    """The messages with OpenAI's ``developer`` role read as ``system`` (the rest is checked later)."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "role": "system"} if isinstance(m, Mapping) and m.get("role") == "developer" else m for m in messages]


def parse_chat_request(body: Any, *, request_id: str | None = None) -> ChatRequest:
    """A ChatRequest from a decoded JSON body; InvalidRequestError / ModelNotFoundError name the field."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("the request body must be a JSON object")
    _refuse_unsupported(body)
    _check_message_fields(body.get("messages"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(f"must be a string, one of {', '.join(MODEL_ALIASES)}", field="model")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):  # true == 1 in Python, not in JSON
        raise InvalidRequestError("only n = 1 is supported", field="n")
    if body.get("user") is not None and not isinstance(body.get("user"), str):
        raise InvalidRequestError("must be a string", field="user")
    sampling: dict[str, Any] = {}
    # the engine's max_new_tokens is max_tokens here, also when the request left it to the daemon's default
    names: dict[str, str] = {"max_new_tokens": "max_tokens"}
    # the newer name wins when both are given; both are checked (a bad value is refused, not ignored)
    limits = {name: _int(body, name, lo=1) for name in ("max_completion_tokens", "max_tokens")}
    for name, n in limits.items():
        if n is not None:
            sampling["max_new_tokens"], names["max_new_tokens"] = n, name
            break
    temperature = _float(body, "temperature", lo=0.0, hi=2.0)
    if temperature is not None:
        sampling["temperature"] = temperature
    top_p = _float(body, "top_p", lo=0.0, hi=1.0, lo_open=True)
    if top_p is not None:
        sampling["top_p"] = top_p
    # OpenAI's schema allows any int64; the sampler's seeds are the non-negative half, so a negative one is taken
    # modulo 2**63 (-1 is 2**63 - 1) rather than refused: clients that send one worked with OpenAI
    seed = _int(body, "seed", lo=-MAX_SEED - 1, hi=MAX_SEED)
    if seed is not None:
        sampling["seed"] = seed % (MAX_SEED + 1)
    stop = stop_list(body.get("stop"))
    if stop:
        sampling["stop"] = stop
    logprobs = _bool(body, "logprobs")
    top_logprobs = _int(body, "top_logprobs", lo=0, hi=20)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise InvalidRequestError("must be an object", field="stream_options")
    if options is not None and not stream:  # as OpenAI's API: options for a stream that was not asked for
        raise InvalidRequestError("only allowed when stream is true", field="stream_options")
    for key in options or ():
        if key not in _STREAM_OPTIONS:
            raise InvalidRequestError(f"unknown field {short_repr(key)}; this server reads "
                                      f"{', '.join(sorted(_STREAM_OPTIONS))}", field=f"stream_options.{key}"[:80])
    include_usage = _bool(options, "include_usage", field="stream_options.include_usage") if options else False
    return build_chat_request(
        messages=_openai_roles(body.get("messages")), model=model, sampling=sampling, stream=stream, logprobs=logprobs,
        top_logprobs=top_logprobs, include_usage=include_usage, request_id=request_id, field_names=names,
    )


# ---- responses ----------------------------------------------------------------------------------


def _finish_reason(reason: str) -> str:
    # the engine says "eos" when the model ended its answer: OpenAI calls that "stop"
    return "stop" if reason in ("eos", "stop", "") else reason


def logprob_entry(token: TokenInfo, token_bytes: TokenBytes) -> dict[str, Any]:
    return {
        "token": token.text,
        "logprob": token.logprob,
        "bytes": token_bytes(token.id),
        "top_logprobs": [t.to_openai() for t in token.top_logprobs or ()],
    }


def usage_object(result: HybridResult) -> dict[str, Any]:
    local, cloud = result.usage["local"], result.usage["cloud"]
    prompt = local["prompt_tokens"] + cloud["prompt_tokens"]
    completion = local["completion_tokens"] + cloud["completion_tokens"]
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                             "local": dict(local), "cloud": dict(cloud),
                             # where OpenAI reports its prompt caching: the local prompt tokens not prefilled again
                             "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens}}
    if any(result.predictions.values()):
        # prompt-lookup drafts, in the fields OpenAI reports its predicted outputs in
        usage["completion_tokens_details"] = {"accepted_prediction_tokens": result.predictions["accepted"],
                                              "rejected_prediction_tokens": result.predictions["rejected"]}
    return usage


def extensions(result: HybridResult, *, queue_ms: float) -> dict[str, Any]:
    """The objects every answer adds to OpenAI's: its route, its cost in energy and money, where the time went."""
    return {
        "routing": {
            "route": result.route,
            "p_correct": result.p_correct,
            "threshold": result.threshold,
            "policy": result.policy,
            "reason": result.reason,
            "detail": result.detail,
            "cloud_error": result.cloud_error,
            "draft": result.draft,
        },
        "energy": dict(result.energy),
        "cost": dict(result.cost),
        "latency": {"queue_ms": round(queue_ms, 3), **result.latency_ms},
    }


def _logprobs(result: HybridResult, req: ChatRequest, is_eos: Callable[[int], bool], token_bytes: TokenBytes,
              ) -> dict[str, Any] | None:
    if not req.logprobs:
        return None
    if result.route == "cloud":  # the bridge sends no per-token log-probabilities
        return {"content": None, "refusal": None}
    content = [logprob_entry(t, token_bytes) for t in result.tokens if not is_eos(t.id)]
    return {"content": content, "refusal": None}


def completion_object(result: HybridResult, req: ChatRequest, *, created: int, queue_ms: float,
                      is_eos: Callable[[int], bool], token_bytes: TokenBytes) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{req.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": result.model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.text, "refusal": None},
            "logprobs": _logprobs(result, req, is_eos, token_bytes),
            "finish_reason": _finish_reason(result.finish_reason),
        }],
        "usage": usage_object(result),
        **extensions(result, queue_ms=queue_ms),
    }


def chunk_object(req: ChatRequest, *, created: int, model: str, delta: Mapping[str, Any],
                 logprobs: list[dict[str, Any]] | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{req.request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "delta": dict(delta),
            "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
            "finish_reason": finish_reason,
        }],
    }


def final_chunk_objects(result: HybridResult, req: ChatRequest, *, created: int,
                        queue_ms: float) -> list[dict[str, Any]]:
    """The stream's last chunk (finish reason, answering model, extensions), then the usage chunk if asked for."""
    last = chunk_object(req, created=created, model=result.model, delta={},
                        finish_reason=_finish_reason(result.finish_reason))
    last.update(extensions(result, queue_ms=queue_ms))
    out = [last]
    if req.include_usage:
        usage = chunk_object(req, created=created, model=result.model, delta={})
        usage["choices"] = []
        usage["usage"] = usage_object(result)
        out.append(usage)
    return out


def models_object(*, created: int, local_model: str, cloud_model: str) -> dict[str, Any]:
    served_by = {"auto": "the policy decides: local, or the cloud when the answer looks unreliable",
                 "local": local_model or "the on-device model", "cloud": cloud_model or "the cloud bridge's default"}
    return {"object": "list", "data": [
        {"id": alias, "object": "model", "created": created, "owned_by": "edge-runtime",
         "description": served_by[alias]}
        for alias in MODEL_ALIASES
    ]}
