"""A chat request as the daemon's core sees it, whichever transport (HTTP/OpenAI or gRPC) it came by.

Both transports build one with :func:`build_chat_request`, so a value is
accepted or refused the same way, with the same field name in the error.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..engine.types import (
    TRUNCATION_HINT,
    SamplingParams,
    check_api_temperature,
    is_plain_request_id,
    short_repr,
    validate_messages,
)
from ..errors import InvalidRequestError, ModelNotFoundError
from ..hybrid import MODEL_ALIASES

__all__ = ["ChatRequest", "HeldEntries", "build_chat_request", "new_request_id", "valid_request_id", "rename_field",
           "stop_list"]



def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: str | None) -> bool:
    return bool(value) and is_plain_request_id(value or "")


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    request_id: str
    messages: list[dict[str, str]]
    model: str = "auto"
    # SamplingParams fields the request set; max_new_tokens absent means the runtime's default
    sampling: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    include_usage: bool = False  # OpenAI stream_options.include_usage
    reveal_draft: bool = False
    # SamplingParams field -> the request's own name for it, for errors ("max_new_tokens" -> "max_tokens")
    field_names: Mapping[str, str] = field(default_factory=dict)

    def param_name(self, field_name: str | None) -> str | None:
        return None if field_name is None else self.field_names.get(field_name, field_name)


def build_chat_request(
    *,
    messages: Any,
    model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    stream: bool = False,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    include_usage: bool = False,
    reveal_draft: bool = False,
    request_id: str | None = None,
    field_names: Mapping[str, str] | None = None,
) -> ChatRequest:
    """Check everything that can be checked without the model; errors name the request's field."""
    names = dict(field_names or {})
    model = model or "auto"
    if model not in MODEL_ALIASES:
        raise ModelNotFoundError(
            f"the model {short_repr(model)} does not exist; this daemon serves {', '.join(MODEL_ALIASES)}", field="model"
        )
    msgs = validate_messages(messages)
    if request_id is not None and not is_plain_request_id(request_id):
        raise InvalidRequestError("must be 1-128 characters from A-Z a-z 0-9 . _ : -", field="request_id")
    if top_logprobs and not logprobs:
        raise InvalidRequestError("needs logprobs = true", field="top_logprobs")
    params = dict(sampling or {})
    check_api_temperature(params.get("temperature"))
    if logprobs:
        params["top_logprobs"] = top_logprobs or 0
    try:
        # checked now with a placeholder length when none was given: the runtime applies its default later
        SamplingParams(**{"max_new_tokens": 1, **params})
    except InvalidRequestError as err:
        raise rename_field(err, names) from err
    return ChatRequest(
        request_id=request_id or new_request_id(),
        messages=msgs,
        model=model,
        sampling=params,
        stream=stream,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        include_usage=include_usage,
        reveal_draft=reveal_draft,
        field_names=names,
    )


def rename_field(err: InvalidRequestError, names: Mapping[str, str]) -> InvalidRequestError:
    """The same error (same class) naming fields as the request did, e.g. max_new_tokens -> max_tokens.

    In its text too ("max_new_tokens 300 does not fit ..."), and without advice the API cannot take (truncation).
    """
    message = str(err)
    prefix = f"{err.field}: "
    if err.field is not None and message.startswith(prefix):  # InvalidRequestError puts the field in front
        message = message[len(prefix):]
    renamed = message.replace(TRUNCATION_HINT, "")
    for engine_name, request_name in names.items():
        renamed = re.sub(rf"\b{re.escape(engine_name)}\b", request_name, renamed)
    field = names.get(err.field, err.field) if err.field is not None else None
    if renamed == message and field == err.field:
        return err
    return type(err)(renamed, field=field)


def stop_list(value: Any, field_name: str = "stop") -> tuple[str, ...]:
    """OpenAI's ``stop``: null, a string, or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidRequestError("must be a string or a list of strings", field=field_name)


Entry = TypeVar("Entry")


class HeldEntries(Generic[Entry]):
    """A stream's per-token log-probability entries whose text has not been shown yet, in token order.

    Text that was held back (a character's first bytes, a possible stop string's start) may come out for only the
    first of the tokens held: the chunk says how many tokens its text shows (``tokens_shown``). The others wait for
    their own text, which a stop string may cut: their entries then never go out, as the answer's logprobs leave
    them out. Before, each text went out with every entry held, a cut stop string's included.
    """

    def __init__(self) -> None:
        self._held: list[tuple[int, Entry | None]] = []
        self._tokens = 0  # tokens seen in this run (an entry of None: one without an entry, an eos)

    def add(self, entry: Entry | None) -> None:
        self._held.append((self._tokens, entry))
        self._tokens += 1

    def shown(self, tokens_shown: int | None) -> list[Entry]:
        """The entries of the tokens a text chunk shows (None: all seen so far), taken out of those held."""
        limit = self._tokens if tokens_shown is None else tokens_shown
        out = [entry for i, entry in self._held if i < limit and entry is not None]
        self._held = [(i, entry) for i, entry in self._held if i >= limit]
        return out
