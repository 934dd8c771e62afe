"""Value types of the cloud client: what an escalation carries and what comes back."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError

__all__ = ["Escalation", "ServerTimings", "CloudResult", "CloudChunk", "ModelInfo"]


@dataclass(frozen=True, kw_only=True)
class Escalation:
    """Why the device escalated and what it would have answered; the bridge may show it to the larger model."""

    draft_answer: str = ""
    p_correct: float | None = None  # the local answer's, 0..1
    reason: str = ""
    policy: str = ""
    local_model: str = ""

    def __post_init__(self) -> None:
        # checked here, naming the field: a string failed as "cannot encode the request", and 1.5 or nan came back
        # from the bridge as its INVALID_ARGUMENT
        p = self.p_correct
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0):
            raise InvalidRequestError(f"must be a probability from 0 to 1 or None, got {p!r:.40}",
                                      field="escalation.p_correct")
        for name in ("draft_answer", "reason", "policy", "local_model"):
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"must be a string, got {type(getattr(self, name)).__name__}",
                                          field=f"escalation.{name}")


@dataclass(frozen=True, kw_only=True)
class ServerTimings:
    """Where the bridge spent its time, in milliseconds."""

    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    generate_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True, kw_only=True)
class CloudResult:
    """The bridge's answer: its text, usage and ``cost_usd`` (the bridge's bill), the ``model`` that answered under
    ``model_alias``, ``server_timings``, and the client's own ``latency_ms`` and attempts."""

    text: str
    finish_reason: str  # "stop", "eos", "length", "cancelled", "content_filter" or "" when unknown
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    model: str  # the model that actually answered
    model_alias: str
    request_id: str
    server_timings: ServerTimings
    latency_ms: float  # the whole call as the device saw it, retries and backoff included
    round_trip_ms: float  # the successful attempt alone
    attempts: int
    # the bridge's bill was no amount (NaN, infinite, negative): cost_usd reads 0, and what was billed is in the
    # bridge's access log only
    cost_unknown: bool = False

    @property
    def network_ms(self) -> float:
        """Time of the successful attempt not spent inside the bridge: network, TLS, (de)serialisation."""
        return max(0.0, self.round_trip_ms - self.server_timings.total_ms)


@dataclass(frozen=True)
class CloudChunk:
    """One step of :meth:`CloudClient.stream`: new text, or (last) the complete result."""

    text: str
    token_count: int = 0
    result: CloudResult | None = None


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """One model the bridge serves (``ListModels``): its alias, backend and model name, context and token limits,
    prices in USD per million tokens, whether it is the default, and what identifies its weights (``revision``, the
    files' hash) and its answers (``bundle_revision``, the whole bundle's), "" when the backend cannot know."""

    alias: str
    backend: str
    model: str
    context_length: int
    max_new_tokens_limit: int
    usd_per_million_input_tokens: float
    usd_per_million_output_tokens: float
    is_default: bool
    revision: str = ""  # the bridge's identity of the weights (an ONNX bundle's files' hash), "" when unknown
    bundle_revision: str = ""  # weights and answering settings (the bundle's hash), "" when unknown or an older bridge
