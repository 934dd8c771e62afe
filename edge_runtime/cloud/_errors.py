"""gRPC failures -> our CloudError subclasses, with the google.rpc details the bridge put in the status."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc

from ..errors import (
    CloudAuthError,
    CloudBill,
    CloudError,
    CloudPriceError,
    CloudQuotaError,
    CloudRequestTooLargeError,
    CloudResponseTooLargeError,
    CloudTimeoutError,
    CloudUnavailableError,
)

__all__ = [
    "CloudRequestTooLargeError",
    "CloudResponseTooLargeError",
    "StatusDetails",
    "status_details",
    "translate_rpc_error",
    "RETRYABLE_CODES",
    "CIRCUIT_CODES",
]

# retried with backoff (RESOURCE_EXHAUSTED after the server's RetryInfo delay when it gives one)
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# failures that say the cloud cannot serve us now: they count towards opening the circuit.
# A bad request or a bad token says nothing about the bridge's health and does not count.
CIRCUIT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    }
)

# gRPC's own refusals of a request over its message size limit, by the client before sending or by the bridge on
# receiving. gRPC core sends them before any handler runs, as RESOURCE_EXHAUSTED with no details to go by: the text
# is the only way to tell them from a quota, and they are the request's fault, not the cloud's.
_TOO_LARGE_PREFIXES = (
    "CLIENT: Sent message larger than max",
    "Sent message larger than max",  # older gRPC releases, without the side
    "SERVER: Received message larger than max",
)
# ... and of an answer over it: by this client on receiving (inside "Stream removed (...)", so searched for, not
# matched at the start) or by the bridge on sending. Not a quota and not an outage: asking again generates (and
# bills) the same answer again, and fails the same way. Older gRPC releases wrote "Received message larger than
# max" without the side, which cannot tell the client's refusal of an answer from the bridge's of a request.
_ANSWER_TOO_LARGE_HINTS = {
    "CLIENT: Received message larger than max": "raise cloud.max_message_bytes",
    "SERVER: Sent message larger than max": "raise the bridge's server.max_message_bytes",
}


@dataclass(frozen=True)
class StatusDetails:
    retry_after_s: float | None = None
    reason: str = ""
    fields: tuple[str, ...] = field(default=())
    metadata: tuple[tuple[str, str], ...] = field(default=())  # the ErrorInfo's


def status_details(err: grpc.RpcError) -> StatusDetails:
    """The google.rpc details (RetryInfo, ErrorInfo, BadRequest) of a failed call, if it has any."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError):  # no trailers, or a code/message mismatch: no usable details
        status = None
    if status is None:
        return StatusDetails()
    retry_after_s, reason, fields, metadata = None, "", [], ()
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after_s = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info_e = error_details_pb2.ErrorInfo()
            detail.Unpack(info_e)
            reason, metadata = info_e.reason, tuple(sorted(info_e.metadata.items()))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            info_b = error_details_pb2.BadRequest()
            detail.Unpack(info_b)
            fields += [v.field for v in info_b.field_violations]
    return StatusDetails(retry_after_s, reason, tuple(fields), metadata)


def _prices(metadata: dict[str, str]) -> tuple[float, float] | None:
    """(input, output) USD per million tokens from PRICE_ABOVE_LIMIT's metadata; None when it has no usable ones."""
    try:
        prices = (float(metadata["usd_per_million_input_tokens"]), float(metadata["usd_per_million_output_tokens"]))
    except (KeyError, ValueError):
        return None
    return prices if all(math.isfinite(p) and p >= 0 for p in prices) else None


def _bill(metadata: dict[str, str]) -> CloudBill | None:
    """The bill a failed call's ErrorInfo carries (``billed_*``, see bridge.proto); None when it has none, or one
    that is no bill (a negative or non-finite cost, a count that is no count): counted as no bill, as before."""
    try:
        bill = CloudBill(float(metadata["billed_cost_usd"]), int(metadata["billed_prompt_tokens"]),
                         int(metadata["billed_completion_tokens"]))
    except (KeyError, ValueError):
        return None
    ok = math.isfinite(bill.cost_usd) and bill.cost_usd >= 0 and bill.prompt_tokens >= 0 and bill.completion_tokens >= 0
    return bill if ok else None


def _answer_too_large_hint(text: str) -> str:
    """What to raise when ``text`` is gRPC's refusal of an answer over its message size limit; "" otherwise."""
    return next((hint for marker, hint in _ANSWER_TOO_LARGE_HINTS.items() if marker in text), "")


def _closed_socket_hint(tls: bool | None, client_cert: bool) -> str:
    """Why a bridge closes the connection at once: gRPC says only "Socket closed" for these."""
    if tls is None:
        return ""
    if not tls:
        return " (the bridge may serve TLS: configure cloud.ca_file instead of cloud.insecure)"
    if not client_cert:
        return " (the bridge may require a client certificate: cloud.cert_file and cloud.key_file)"
    return " (the bridge may not accept this client certificate: check that its CA signed it and its dates)"


# gRPC's text for the bridge's certificate failing the device's checks, and the setting that decides each
# (the first that matches: the dates' texts also say CERTIFICATE_VERIFY_FAILED)
_HANDSHAKE_HINTS = {
    "certificate has expired": " (the bridge's certificate has expired, or this device's clock is wrong)",
    "certificate is not yet valid": " (this device's clock is behind the bridge's certificate: set the clock, NTP)",
    "CERTIFICATE_VERIFY_FAILED": " (the bridge's certificate is not signed by a CA the device trusts: cloud.ca_file, "
                                 "or the system roots without it)",
    "Hostname Verification": " (the bridge's certificate does not name the host of cloud.address: use that name, "
                             "or set cloud.server_name to one it carries)",
    "WRONG_VERSION_NUMBER": " (the bridge may not serve TLS: one started with --insecure, on this machine, needs "
                            "cloud.insecure = true)",
}


def _handshake_hint(text: str) -> str:
    return next((hint for marker, hint in _HANDSHAKE_HINTS.items() if marker in text), "")


def translate_rpc_error(err: grpc.RpcError, details: StatusDetails | None = None, *, tls: bool | None = None,
                        client_cert: bool = False) -> CloudError:
    """The most specific CloudError for a failed call; ``code`` is the gRPC status name.

    ``tls`` (whether the channel uses TLS; None: unknown) and ``client_cert`` only add a hint to a
    connection the bridge closed during the handshake.
    """
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    text = err.details() if isinstance(err, grpc.Call) else str(err)
    details = details if details is not None else status_details(err)
    message = f"cloud bridge: {code.name}: {text}" + (f" [{details.reason}]" if details.reason else "")
    if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in (text or ""):
        message += _closed_socket_hint(tls, client_cert)
    elif code == grpc.StatusCode.UNAVAILABLE:
        message += _handshake_hint(text or "")
    name = code.name
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CloudAuthError(message, code=name)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (hint := _answer_too_large_hint(text or "")):
        return CloudResponseTooLargeError(
            f"{message}: the answer is larger than a gRPC message may be: {hint} (or ask for fewer max_new_tokens)",
            code=name,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (text or "").startswith(_TOO_LARGE_PREFIXES):
        return CloudRequestTooLargeError(f"{message}: shorten the messages", code=name)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CloudQuotaError(message, code=name, retry_after_s=details.retry_after_s, reason=details.reason)
    if code == grpc.StatusCode.FAILED_PRECONDITION and details.reason == "PRICE_ABOVE_LIMIT":
        return CloudPriceError(message, code=name, prices=_prices(dict(details.metadata)))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        error: CloudError = CloudTimeoutError(message, code=name)
    elif code in CIRCUIT_CODES:
        error = CloudUnavailableError(message, code=name)
    else:
        error = CloudError(message, code=name)
    # a bill the bridge sent with the failure: a stream its own timeout_s cut after its first words carries one
    # too (read only for the other codes before, so the device settled its estimate and called the cost unknown)
    error.billed = _bill(dict(details.metadata))
    return error
