"""Escalation to the cloud bridge: :class:`CloudClient` and its settings and value types.

    from edge_runtime.cloud import CloudClient, Escalation
    with CloudClient(address="bridge.example:50051", token=token, ca_file=ca) as cloud:
        result = cloud.generate(messages, escalation=Escalation(draft_answer=draft, p_correct=0.41))

Every failure is a :class:`~edge_runtime.errors.CloudError` subclass;
:class:`~edge_runtime.errors.CircuitOpenError` means the cloud is being skipped
for now and the caller should answer locally.
"""

from __future__ import annotations

from ._address import check_address, is_loopback_address
from ._channel import open_channel
from ._circuit import CircuitBreaker, CircuitState
from ._client import ACCEPTED_METADATA_KEY, SERVICE_NAME, CloudClient
from ._errors import (
    CIRCUIT_CODES,
    RETRYABLE_CODES,
    CloudRequestTooLargeError,
    CloudResponseTooLargeError,
    StatusDetails,
    status_details,
    translate_rpc_error,
)
from ._settings import CloudSettings
from ._tls import check_certificates, check_key_pair
from ._types import CloudChunk, CloudResult, Escalation, ModelInfo, ServerTimings

__all__ = [
    "CloudClient",
    "CloudSettings",
    "CloudResult",
    "CloudChunk",
    "Escalation",
    "ModelInfo",
    "ServerTimings",
    "CircuitBreaker",
    "CircuitState",
    "SERVICE_NAME",
    "ACCEPTED_METADATA_KEY",
    "RETRYABLE_CODES",
    "CloudRequestTooLargeError",
    "CloudResponseTooLargeError",
    "CIRCUIT_CODES",
    "StatusDetails",
    "status_details",
    "translate_rpc_error",
    "is_loopback_address",
    "check_address",
    "check_certificates",
    "check_key_pair",
    "open_channel",
]
