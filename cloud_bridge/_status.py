"""gRPC statuses with google.rpc details: how the bridge says what went wrong and what to do about it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = ["DOMAIN", "Reject", "make_status", "bad_request", "retry_info", "error_info", "bill_metadata", "with_metadata",
           "quota_failure"]

DOMAIN = "edgecloud.v1"
_MAX_RETRY_DELAY_S = 86400.0


class Reject(Exception):
    """Internal control flow: end the current call with ``status``. Never leaves the servicer."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status
        self.request_id = "-"  # the caller's id, for the log, once it is known to be safe to write there
        self.device = "-"  # the caller's device, once its token is known

    @property
    def reason(self) -> str:
        """The ErrorInfo reason of the status ("-" without one): the log line says it, as the client reads it."""
        proto = _status_proto(self.status)
        found = _error_info(proto) if proto is not None else None
        return found[1].reason if found is not None else "-"


def _status_proto(status: grpc.Status) -> status_pb2.Status | None:
    """The google.rpc.Status a status carries in its trailers (None: it has no details)."""
    return next((status_pb2.Status.FromString(value) for key, value in status.trailing_metadata or ()
                 if key == "grpc-status-details-bin"), None)


def _error_info(proto: status_pb2.Status) -> tuple[Any, error_details_pb2.ErrorInfo] | None:
    """The first ErrorInfo among ``proto``'s details, with the detail that holds it."""
    for detail in proto.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return detail, info
    return None


def make_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def bad_request(field: str, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )


def retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    # a Duration holds ~10,000 years and no infinity: a delay past a day is a mistake somewhere, not advice
    delay_s = min(max(0.0, delay_s), _MAX_RETRY_DELAY_S) if math.isfinite(delay_s) else _MAX_RETRY_DELAY_S
    seconds = int(delay_s)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((delay_s - seconds) * 1e9))
    )


def error_info(reason: str, metadata: Mapping[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))


def bill_metadata(cost_usd: float, prompt_tokens: int, completion_tokens: int) -> dict[str, str]:
    """ErrorInfo metadata for a failed call the bridge billed all the same (see bridge.proto): the bill and the
    counts it was made from. ``repr``: the float a device reads back is the one billed, to the last digit."""
    return {"billed_cost_usd": repr(float(cost_usd)), "billed_prompt_tokens": str(int(prompt_tokens)),
            "billed_completion_tokens": str(int(completion_tokens))}


def with_metadata(status: grpc.Status, metadata: Mapping[str, str]) -> grpc.Status:
    """``status`` with ``metadata`` added to its ErrorInfo, or to a new BACKEND_FAILED one when it has none."""
    if not metadata:
        return status
    proto = _status_proto(status)
    if proto is None:
        proto = status_pb2.Status(code=status.code.value[0], message=status.details)
    found = _error_info(proto)
    if found is None:
        proto.details.add().Pack(error_info("BACKEND_FAILED", metadata))
    else:
        detail, info = found
        info.metadata.update(metadata)
        detail.Pack(info)
    return rpc_status.to_status(proto)


def quota_failure(subject: str, description: str) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)]
    )
