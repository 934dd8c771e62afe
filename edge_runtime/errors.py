"""The one exception tree of the project.

Every error the runtime raises on purpose derives from :class:`EdgeRuntimeError`;
foreign errors (onnxruntime, grpc, OS) are translated at the boundary with
``raise ... from err`` so callers only ever need to catch our types::

    EdgeRuntimeError
     ├── ConfigError                 bad settings value (names the field)
     ├── InvalidRequestError         bad generation/request parameter (names the field)
     │    ├── ContextLengthError     prompt + max_new_tokens exceed the context window
     │    └── ModelNotFoundError     a request named a model the daemon does not serve
     ├── BundleError                 a model bundle cannot be used
     │    ├── BundleNotFoundError
     │    ├── BundleVerificationError   a file's size or SHA-256 does not match (names the file)
     │    └── UnsupportedModelError     architecture we cannot export/run
     ├── ModelFetchError             default-model download/reassembly failed
     ├── BuildError                  bundle build failed (nothing left at the output)
     │    └── QualityGateError       quantized perplexity ratio above the limit
     ├── OutOfMemoryError            the device ran out of memory loading a bundle or running a request
     │                               (also a MemoryError)
     ├── EnergyError                 power/energy measurement problem
     ├── EstimatorError              confidence estimator file unusable
     ├── QueueFullError              bounded queue is full (carries retry_after_s)
     ├── ServiceUnavailableError     the daemon is loading its model or shutting down (carries retry_after_s)
     ├── RequestTimeoutError         a daemon request ran past its deadline (the generation was stopped)
     ├── CloudError                  escalation to the cloud bridge failed
     │    ├── CloudAuthError         UNAUTHENTICATED / PERMISSION_DENIED
     │    ├── CloudQuotaError        RESOURCE_EXHAUSTED (carries retry_after_s)
     │    ├── CloudTimeoutError      deadline exceeded
     │    ├── CloudPriceError        the bridge's price rose above what the call was budgeted at (carries prices)
     │    ├── CloudUnavailableError  UNAVAILABLE or transport failure
     │    ├── CircuitOpenError       circuit breaker open: the cloud is skipped
     │    ├── CloudRequestTooLargeError   over gRPC's message size (also an InvalidRequestError naming messages)
     │    ├── CloudResponseTooLargeError  the bridge's answer is over gRPC's message size (raise max_message_bytes)
     │    └── CloudCancelledError    the caller cancelled the call (its ``cancel`` turned true)
     ├── BackendError                a cloud-bridge backend (engine, upstream API) failed (carries the gRPC code)
     └── TaskSuiteError              a task suite cannot be loaded (names the file line and field)
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "EdgeRuntimeError",
    "ConfigError",
    "InvalidRequestError",
    "ContextLengthError",
    "BundleError",
    "BundleNotFoundError",
    "BundleVerificationError",
    "UnsupportedModelError",
    "ModelFetchError",
    "BuildError",
    "QualityGateError",
    "OutOfMemoryError",
    "EnergyError",
    "EstimatorError",
    "QueueFullError",
    "CloudBill",
    "CloudError",
    "CloudAuthError",
    "CloudQuotaError",
    "CloudTimeoutError",
    "CloudPriceError",
    "CloudUnavailableError",
    "CircuitOpenError",
    "CloudRequestTooLargeError",
    "CloudResponseTooLargeError",
    "CloudCancelledError",
    "BackendError",
    "TaskSuiteError",
    "ModelNotFoundError",
    "ServiceUnavailableError",
    "RequestTimeoutError",
]


class EdgeRuntimeError(Exception):
    """Base class of every error raised by edge_runtime, quantize and cloud_bridge."""


class ConfigError(EdgeRuntimeError):
    """A settings value is invalid; ``field`` names it (dotted path)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidRequestError(EdgeRuntimeError):
    """A request parameter is invalid; ``field`` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class ContextLengthError(InvalidRequestError):
    """The prompt plus ``max_new_tokens`` does not fit the model's context window."""


class BundleError(EdgeRuntimeError):
    """A model bundle cannot be loaded or used."""


class BundleNotFoundError(BundleError):
    """No bundle at the path, and no cached bundle or known model of that name."""


class BundleVerificationError(BundleError):
    """A bundle file is missing, has the wrong size or the wrong SHA-256; ``file`` names it."""

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class UnsupportedModelError(BundleError):
    """The model's architecture or files are not ones ``quantize`` can build a bundle from."""


class ModelFetchError(EdgeRuntimeError):
    """A model could not be fetched: an unknown name, a download that failed, or a file that failed its pinned
    SHA-256."""


class BuildError(EdgeRuntimeError):
    """Building a bundle (``edge-runtime quantize``) failed."""


class QualityGateError(BuildError):
    """A built bundle's perplexity is further from the fp32 model's than ``--max-ppl-ratio`` allows."""


class OutOfMemoryError(EdgeRuntimeError, MemoryError):
    """Not enough memory to load a bundle or to run a request (Python's, numpy's or onnxruntime's allocation failed).

    Also a ``MemoryError``, so code that catches that keeps working; the process can go on serving
    requests that need less."""


class EnergyError(EdgeRuntimeError):
    """An energy source cannot be read, or the one asked for is not on this device."""


class EstimatorError(EdgeRuntimeError):
    """An estimator file cannot be read, or was calibrated for another bundle."""


class QueueFullError(EdgeRuntimeError):
    """A bounded queue refused work; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CloudBill(NamedTuple):
    """What the bridge billed for a call that failed all the same (an answer its upstream billed and it could not
    use, the words a stream sent before its upstream failed), as it said in the failure."""

    cost_usd: float
    prompt_tokens: int
    completion_tokens: int


class CloudError(EdgeRuntimeError):
    """Escalation to the cloud bridge failed. ``code`` is the gRPC status name when known.

    ``skipped`` is True when the client refused the call itself, without asking the bridge. ``billed``: the
    bridge's bill for the failed call, when it billed it and said so (None: it said nothing of a bill).
    ``bridge_accepted``: the bridge had taken the call (its ``edgecloud-accepted`` metadata came). ``lost``: it had,
    and the call then ended without the bridge saying how (the connection broke, the bridge stopped): what it
    generated until then may be billed, so the call is not asked again and its cost is unknown.
    """

    skipped = False
    billed: CloudBill | None = None
    bridge_accepted = False
    lost = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class CloudAuthError(CloudError):
    """The bridge refused the device's token (missing, unknown or revoked): not retried, not an outage."""


class CloudQuotaError(CloudError):
    """The bridge or its upstream refused the call for now; ``retry_after_s``: when to try again, if it said.

    ``reason`` is the bridge's ErrorInfo reason: ``QUOTA_EXCEEDED`` when this device's own quota at the bridge
    is spent (the bridge is healthy), ``BRIDGE_BUSY`` or an upstream's rate limit otherwise.
    """

    def __init__(
        self, message: str, *, code: str | None = None, retry_after_s: float | None = None, reason: str = ""
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
        self.reason = reason


class CloudTimeoutError(CloudError):
    """The escalation ran out of its time (``timeout_s``, or the caller's deadline)."""


class CloudPriceError(CloudError):
    """The bridge's price for the model is above what this call was budgeted at (its prices changed since they
    were read); refused before anything was generated, so nothing was billed. ``prices``: the bridge's current
    (input, output) USD per million tokens. Not retried at the old price, and not a cloud outage."""

    def __init__(self, message: str, *, code: str | None = None,
                 prices: tuple[float, float] | None = None) -> None:
        super().__init__(message, code=code)
        self.prices = prices


class CloudUnavailableError(CloudError):
    """The bridge could not be reached or could not answer (down, overloaded, its upstream failed)."""


class CircuitOpenError(CloudError):
    """Escalations are skipped for a while after consecutive failures (the circuit breaker is open): the bridge
    was not asked."""

    skipped = True


class CloudRequestTooLargeError(CloudError, InvalidRequestError):
    """The request is larger than a gRPC message may be (``field`` is ``messages``). Not retried, not a cloud outage.

    A CloudError too, so a caller that falls back to the local answer when the cloud fails still does.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        InvalidRequestError.__init__(self, message, field="messages")
        self.code = code


class CloudResponseTooLargeError(CloudError):
    """The bridge's answer is larger than a gRPC message may be, on this side or the bridge's.

    Not retried (each try is another generation the upstream bills) and not a cloud outage:
    raise ``cloud.max_message_bytes`` (or the bridge's ``server.max_message_bytes``), or ask for fewer tokens.
    """


class CloudCancelledError(CloudError):
    """The caller cancelled the call (its ``cancel`` returned True); a call under way was cancelled, and with it
    the bridge's generation. Not retried, and not a cloud outage.
    """


class BackendError(EdgeRuntimeError):
    """A cloud-bridge backend (the engine or an upstream HTTP API) failed.

    ``code`` is the gRPC status name the bridge answers with, ``retry_after_s`` the
    upstream's retry delay when it gave one, ``reason`` a short machine-readable cause
    (it goes into the status' google.rpc.ErrorInfo).
    """

    def __init__(
        self, message: str, *, code: str = "UNAVAILABLE", retry_after_s: float | None = None, reason: str = "BACKEND_FAILED"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s
        self.reason = reason


class TaskSuiteError(EdgeRuntimeError):
    """A task suite (built-in name or JSONL file) cannot be loaded.

    ``line`` is the 1-based line of a JSONL file and ``field`` the offending key, when known.
    """

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.field = field


class ModelNotFoundError(InvalidRequestError):
    """A request named a model (alias) that is not served."""


class ServiceUnavailableError(EdgeRuntimeError):
    """The daemon cannot take requests now; ``reason`` says why (``model_loading``, ``shutting_down``).

    Retry after ``retry_after_s`` seconds (None: do not expect it to come back soon).
    """

    def __init__(self, message: str, *, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class RequestTimeoutError(EdgeRuntimeError):
    """A daemon request ran past its deadline, queueing included; its generation was stopped."""
