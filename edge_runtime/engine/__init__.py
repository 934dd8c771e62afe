"""Generation engine: runs a model bundle with onnxruntime, token by token, with confidence signals.

onnxruntime and tokenizers are imported when an Engine is created, not when
this package is imported, so the value types stay cheap to use elsewhere.
"""

from ._lookup import MAX_PROMPT_LOOKUP_TOKENS, PROMPT_LOOKUP_TOKENS, SUGGESTED_PROMPT_LOOKUP_TOKENS
from .engine import Cancel, ChatSession, Engine, ScoreResult
from .types import (
    EnergyReport,
    FinishReason,
    GenerationResult,
    Message,
    ProviderSpec,
    SamplingParams,
    StreamChunk,
    Timings,
    TokenInfo,
    TopLogprob,
    Usage,
    provider_specs,
    validate_messages,
)

__all__ = [
    "Engine",
    "ChatSession",
    "Cancel",
    "ScoreResult",
    "PROMPT_LOOKUP_TOKENS",
    "SUGGESTED_PROMPT_LOOKUP_TOKENS",
    "MAX_PROMPT_LOOKUP_TOKENS",
    "EnergyReport",
    "FinishReason",
    "GenerationResult",
    "Message",
    "ProviderSpec",
    "SamplingParams",
    "StreamChunk",
    "Timings",
    "TokenInfo",
    "TopLogprob",
    "Usage",
    "provider_specs",
    "validate_messages",
]
