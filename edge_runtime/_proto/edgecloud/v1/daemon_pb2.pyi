from edge_runtime._proto.edgecloud.v1 import bridge_pb2 as _bridge_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatRequest(_message.Message):
    __slots__ = ("request_id", "messages", "model", "sampling", "max_new_tokens", "logprobs", "top_logprobs", "reveal_draft")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REVEAL_DRAFT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_bridge_pb2.ChatMessage]
    model: str
    sampling: _bridge_pb2.SamplingParams
    max_new_tokens: int
    logprobs: bool
    top_logprobs: int
    reveal_draft: bool
    def __init__(self, request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_bridge_pb2.ChatMessage, _Mapping]]] = ..., model: _Optional[str] = ..., sampling: _Optional[_Union[_bridge_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., reveal_draft: _Optional[bool] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token", "logprob", "token_bytes")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    token_bytes: bytes
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ..., token_bytes: _Optional[bytes] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "token_bytes", "top_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: str
    logprob: float
    token_bytes: bytes
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token: _Optional[str] = ..., logprob: _Optional[float] = ..., token_bytes: _Optional[bytes] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Routing(_message.Message):
    __slots__ = ("route", "p_correct", "threshold", "policy", "reason", "detail", "cloud_error", "draft")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    P_CORRECT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CLOUD_ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    route: str
    p_correct: float
    threshold: float
    policy: str
    reason: str
    detail: str
    cloud_error: str
    draft: str
    def __init__(self, route: _Optional[str] = ..., p_correct: _Optional[float] = ..., threshold: _Optional[float] = ..., policy: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., cloud_error: _Optional[str] = ..., draft: _Optional[str] = ...) -> None: ...

class Energy(_message.Message):
    __slots__ = ("joules", "source", "estimated", "process_joules", "seconds", "network_joules", "wait_joules", "estimator_joules")
    JOULES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    PROCESS_JOULES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_JOULES_FIELD_NUMBER: _ClassVar[int]
    WAIT_JOULES_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_JOULES_FIELD_NUMBER: _ClassVar[int]
    joules: float
    source: str
    estimated: bool
    process_joules: float
    seconds: float
    network_joules: float
    wait_joules: float
    estimator_joules: float
    def __init__(self, joules: _Optional[float] = ..., source: _Optional[str] = ..., estimated: _Optional[bool] = ..., process_joules: _Optional[float] = ..., seconds: _Optional[float] = ..., network_joules: _Optional[float] = ..., wait_joules: _Optional[float] = ..., estimator_joules: _Optional[float] = ...) -> None: ...

class Cost(_message.Message):
    __slots__ = ("cloud_usd", "device_energy_usd", "network_energy_j", "total_usd", "device_energy_estimated", "cloud_usd_unknown")
    CLOUD_USD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ENERGY_USD_FIELD_NUMBER: _ClassVar[int]
    NETWORK_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    TOTAL_USD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ENERGY_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    CLOUD_USD_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    cloud_usd: float
    device_energy_usd: float
    network_energy_j: float
    total_usd: float
    device_energy_estimated: bool
    cloud_usd_unknown: bool
    def __init__(self, cloud_usd: _Optional[float] = ..., device_energy_usd: _Optional[float] = ..., network_energy_j: _Optional[float] = ..., total_usd: _Optional[float] = ..., device_energy_estimated: _Optional[bool] = ..., cloud_usd_unknown: _Optional[bool] = ...) -> None: ...

class RouteUsage(_message.Message):
    __slots__ = ("local", "cloud", "accepted_prediction_tokens", "rejected_prediction_tokens", "cached_prompt_tokens")
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    CLOUD_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PREDICTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_PREDICTION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    local: _bridge_pb2.Usage
    cloud: _bridge_pb2.Usage
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int
    cached_prompt_tokens: int
    def __init__(self, local: _Optional[_Union[_bridge_pb2.Usage, _Mapping]] = ..., cloud: _Optional[_Union[_bridge_pb2.Usage, _Mapping]] = ..., accepted_prediction_tokens: _Optional[int] = ..., rejected_prediction_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Latency(_message.Message):
    __slots__ = ("queue_ms", "local_prefill_ms", "local_decode_ms", "cloud_ms", "network_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    local_prefill_ms: float
    local_decode_ms: float
    cloud_ms: float
    network_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., local_prefill_ms: _Optional[float] = ..., local_decode_ms: _Optional[float] = ..., cloud_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("request_id", "text", "finish_reason", "model", "routing", "energy", "cost", "usage", "latency", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    finish_reason: _bridge_pb2.FinishReason
    model: str
    routing: Routing
    energy: Energy
    cost: Cost
    usage: RouteUsage
    latency: Latency
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_bridge_pb2.FinishReason, str]] = ..., model: _Optional[str] = ..., routing: _Optional[_Union[Routing, _Mapping]] = ..., energy: _Optional[_Union[Energy, _Mapping]] = ..., cost: _Optional[_Union[Cost, _Mapping]] = ..., usage: _Optional[_Union[RouteUsage, _Mapping]] = ..., latency: _Optional[_Union[Latency, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ChatDelta(_message.Message):
    __slots__ = ("text", "logprob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    logprob: TokenLogprob
    def __init__(self, text: _Optional[str] = ..., logprob: _Optional[_Union[TokenLogprob, _Mapping]] = ...) -> None: ...

class Withdraw(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChatStreamResponse(_message.Message):
    __slots__ = ("delta", "withdraw", "final")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    delta: ChatDelta
    withdraw: Withdraw
    final: ChatResponse
    def __init__(self, delta: _Optional[_Union[ChatDelta, _Mapping]] = ..., withdraw: _Optional[_Union[Withdraw, _Mapping]] = ..., final: _Optional[_Union[ChatResponse, _Mapping]] = ...) -> None: ...
