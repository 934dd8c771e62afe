"""Our errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Types are mapped, never messages. ``type`` and ``code`` follow what OpenAI's API
sends where it has an equivalent (``invalid_request_error`` with code
``context_length_exceeded`` / ``model_not_found``), so clients written for it
react the same way; the rest are ours and stable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..engine.types import well_formed
from ..errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)

__all__ = ["ApiError", "api_error"]


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        # a message or param may echo a client's field name with half a character in it (JSON's "\ud800" escape)
        return {"error": {"message": well_formed(self.message), "type": self.type,
                          "param": None if self.param is None else well_formed(self.param), "code": self.code}}

    def all_headers(self) -> dict[str, str]:
        out = dict(self.headers)
        if self.retry_after_s is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))  # whole seconds (RFC 9110)
        return out


def api_error(err: BaseException, *, param: str | None = None) -> ApiError:
    """The HTTP answer for ``err``; ``param`` overrides the field an InvalidRequestError names."""
    if isinstance(err, ModelNotFoundError):
        return ApiError(404, str(err), "invalid_request_error", "model", "model_not_found")
    if isinstance(err, ContextLengthError):
        return ApiError(400, str(err), "invalid_request_error", param or err.field or "messages",
                        "context_length_exceeded")
    if isinstance(err, InvalidRequestError):
        return ApiError(400, str(err), "invalid_request_error", param or err.field, "invalid_value")
    if isinstance(err, QueueFullError):
        return ApiError(429, str(err), "rate_limit_error", None, "queue_full", retry_after_s=err.retry_after_s)
    if isinstance(err, ServiceUnavailableError):
        return ApiError(503, str(err), "server_error", None, err.reason, retry_after_s=err.retry_after_s)
    if isinstance(err, RequestTimeoutError):
        # the same request would run out of time again, each try burning the whole timeout of the device: OpenAI's
        # SDKs retry every 5xx twice unless told not to
        return ApiError(504, str(err), "server_error", None, "request_timeout", headers={"x-should-retry": "false"})
    if isinstance(err, OutOfMemoryError):  # the device's problem, not the request's: a smaller one, or this one later, may fit
        return ApiError(503, str(err), "server_error", None, "out_of_memory")
    # anything else is our bug or the machine's problem: say so without leaking internals
    return ApiError(500, "the daemon failed to answer this request (see its log)", "server_error", None,
                    "internal_error")
