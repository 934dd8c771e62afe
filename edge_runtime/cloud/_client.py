"""The device's side of escalation: a CloudClient that never hangs and never hides a failure.

Every call has a deadline (``timeout_s``, retries and backoff included).
UNAVAILABLE and RESOURCE_EXHAUSTED are retried with exponential backoff and
jitter, RESOURCE_EXHAUSTED after the delay the bridge asks for (RetryInfo);
a retry that could not finish before the deadline is not started. A stream is
retried only before its first text reached the caller. A circuit breaker skips
the cloud (CircuitOpenError, at once) after repeated failures, so the runtime
can answer locally and mark the answer as a fallback. Every failure is one of
the CloudError subclasses of :mod:`edge_runtime.errors`. A request larger than
a gRPC message may be (on this side or the bridge's) is a
CloudRequestTooLargeError, also an InvalidRequestError naming ``messages``:
never retried, and not counted by the circuit breaker; an answer too large for
one is a CloudResponseTooLargeError, the same. Nor is a call the caller cut
short counted: one that ran out of a deadline shorter than the configured
``timeout_s`` (the caller's own, e.g. a daemon request's), or a stream whose
``cancel`` turned true (CloudCancelledError; the call, and with it the bridge's
generation, is cancelled within about 0.1 s, even while waiting for a chunk).
A refusal because this device's own quota at the bridge is spent (ErrorInfo
QUOTA_EXCEEDED) is not counted either: until the retry time the bridge gave,
calls are refused at once (CloudQuotaError) without asking the bridge.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from .._proto.edgecloud.v1 import bridge_pb2, bridge_pb2_grpc
from ..engine.types import Message, SamplingParams, validate_messages
from ..errors import (
    CircuitOpenError,
    CloudCancelledError,
    CloudError,
    CloudQuotaError,
    CloudResponseTooLargeError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    InvalidRequestError,
)
from ._channel import open_channel
from ._circuit import CircuitBreaker
from ._errors import CIRCUIT_CODES, RETRYABLE_CODES, status_details, translate_rpc_error
from ._settings import MAX_SECONDS, CloudSettings
from ._types import CloudChunk, CloudResult, Escalation, ModelInfo, ServerTimings

__all__ = ["CloudClient", "SERVICE_NAME", "ACCEPTED_METADATA_KEY"]

SERVICE_NAME = bridge_pb2.DESCRIPTOR.services_by_name["CloudBridge"].full_name
# initial metadata the bridge sends as soon as it has accepted a call: the sign of a bridge that is alive
# (a host that accepts connections and never answers sends none)
ACCEPTED_METADATA_KEY = "edgecloud-accepted"


def _bridge_accepted(call: object) -> bool:
    """Whether the bridge had accepted the (finished) call: its initial metadata carries the marker."""
    try:
        metadata = call.initial_metadata() if isinstance(call, grpc.Call) else None
    except Exception:  # a call that never started has none to give
        return False
    return any(key == ACCEPTED_METADATA_KEY for key, _value in (metadata or ()))

_FINISH_NAMES = {
    bridge_pb2.FINISH_REASON_STOP: "stop",
    bridge_pb2.FINISH_REASON_EOS: "eos",
    bridge_pb2.FINISH_REASON_LENGTH: "length",
    bridge_pb2.FINISH_REASON_CANCELLED: "cancelled",
    bridge_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}

T = TypeVar("T")
log = logging.getLogger(__name__)
_CIRCUIT_CODE_NAMES = frozenset(code.name for code in CIRCUIT_CODES)
# failures of the request or the caller, whatever their gRPC code (a too-large message is RESOURCE_EXHAUSTED, a
# cancelled call CANCELLED): the same call again fails the same way or is not wanted, and the bridge is not to blame
_NEUTRAL_ERRORS = (InvalidRequestError, CloudResponseTooLargeError, CloudCancelledError)
# the bridge's ErrorInfo reason for a device whose own quota is spent
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
# the longest the client refuses calls itself after such a refusal, whatever retry time the bridge gave
_MAX_QUOTA_SKIP_S = 300.0
# how often a stream's ``cancel`` is polled while the caller's thread waits for the bridge
_CANCEL_POLL_S = 0.05
# gRPC and the client's clock may read a deadline a hair apart; an expiry this close to it is the deadline's
_DEADLINE_SLACK_S = 0.01


def _request(
    messages: Sequence[Message],
    *,
    model: str,
    params: SamplingParams | None,
    escalation: Escalation | None,
    request_id: str,
    max_prices: tuple[float, float] | None = None,
) -> bridge_pb2.GenerateRequest:
    try:
        return _encode(messages, model=model, params=params, escalation=escalation, request_id=request_id,
                       max_prices=max_prices)
    except (ValueError, TypeError) as err:  # a value protobuf cannot carry (e.g. past int64): the call fails, not the app
        raise CloudError(f"cannot encode the request for the bridge: {err}") from err


def _encode(
    messages: Sequence[Message],
    *,
    model: str,
    params: SamplingParams | None,
    escalation: Escalation | None,
    request_id: str,
    max_prices: tuple[float, float] | None = None,
) -> bridge_pb2.GenerateRequest:
    req = bridge_pb2.GenerateRequest(request_id=request_id, model=model)
    if max_prices is not None:
        req.max_usd_per_million_input_tokens, req.max_usd_per_million_output_tokens = max_prices
    for m in messages:
        req.messages.add(role=str(m.get("role", "")), content=str(m.get("content", "")))
    if params is not None:
        req.max_new_tokens = params.max_new_tokens
        req.sampling.temperature = params.temperature
        req.sampling.top_p = params.top_p
        req.sampling.top_k = params.top_k
        if params.seed is not None:
            req.sampling.seed = params.seed
        req.sampling.stop.extend(params.stop)
    if escalation is not None:
        e = req.escalation
        e.draft_answer, e.reason, e.policy, e.local_model = (
            escalation.draft_answer,
            escalation.reason,
            escalation.policy,
            escalation.local_model,
        )
        if escalation.p_correct is not None:
            e.p_correct = escalation.p_correct
    return req


# more tokens than any one call processes (a million-token context and its answer, many times over)
_MAX_TOKENS_PER_CALL = 1 << 31


def _result(
    resp: bridge_pb2.GenerateResponse, *, latency_ms: float, round_trip_ms: float, attempts: int
) -> CloudResult:
    t = resp.timings
    # a bill is an amount: a NaN one disabled every budget it was counted in (nothing compares below NaN), and a
    # negative one ran the cost counters backwards
    cost_unknown = not (math.isfinite(resp.cost_usd) and resp.cost_usd >= 0)
    if cost_unknown:
        log.warning("cloud bridge: the answer's bill is %r, no amount: its cost is unknown here", resp.cost_usd)
    # likewise token counts: a negative one ran usage totals backwards, 2**62 swamped them
    counts = (resp.usage.prompt_tokens, resp.usage.completion_tokens)
    if not all(0 <= n <= _MAX_TOKENS_PER_CALL for n in counts):
        log.warning("cloud bridge: the answer's usage (%d prompt, %d completion tokens) is no count: counted as 0",
                    *counts)
        counts = (0, 0)
    return CloudResult(
        text=resp.text,
        finish_reason=_FINISH_NAMES.get(resp.finish_reason, ""),
        prompt_tokens=counts[0],
        completion_tokens=counts[1],
        cost_usd=0.0 if cost_unknown else resp.cost_usd,
        cost_unknown=cost_unknown,
        model=resp.model,
        model_alias=resp.model_alias,
        request_id=resp.request_id,
        server_timings=ServerTimings(
            queue_ms=t.queue_ms, ttft_ms=t.ttft_ms, generate_ms=t.generate_ms, total_ms=t.total_ms
        ),
        latency_ms=latency_ms,
        round_trip_ms=round_trip_ms,
        attempts=attempts,
    )


def _ignore(*_args: object, **_kwargs: object) -> None:
    pass


def _cancelled_error() -> CloudCancelledError:
    return CloudCancelledError("cloud bridge: the call was cancelled by its caller", code="CANCELLED")


def _raise_if_cancelled(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise _cancelled_error()


class _CancelWatcher:
    """Cancels a gRPC call within ``_CANCEL_POLL_S`` of ``cancel()`` turning true, until stopped or the call ends.

    The caller's thread is blocked inside the call waiting for the bridge's next chunk, so it cannot look
    itself; grpc's ``call.cancel()`` is thread-safe, and cancelling the call cancels the bridge's generation.
    """

    def __init__(self, call: grpc.Future, cancel: Callable[[], bool] | None) -> None:
        self.fired = False
        self._stopped = threading.Event()
        if cancel is not None:
            threading.Thread(target=self._watch, args=(call, cancel), name="cloud-cancel", daemon=True).start()
            # an ended call has nothing left to cancel, even if its caller never reads on (or closes) the stream
            call.add_done_callback(lambda _call: self.stop())

    def _watch(self, call: grpc.Future, cancel: Callable[[], bool]) -> None:
        while not self._stopped.wait(_CANCEL_POLL_S):
            if cancel():
                self.fired = True  # before cancelling: the RpcError it causes must find it set
                call.cancel()
                return

    def stop(self) -> None:
        self._stopped.set()


class CloudClient:
    """A client of the cloud bridge. Thread-safe; close it (or use ``with``) to release the channel.

    ``CloudClient(settings)`` or ``CloudClient(address=..., token=..., insecure=True, ...)``
    (keywords are :class:`CloudSettings` fields). ``clock``, ``sleep`` and ``rng``
    are seams for tests.
    """

    def __init__(
        self,
        settings: CloudSettings | None = None,
        *,
        channel: grpc.Channel | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        **fields: Any,
    ) -> None:
        if settings is not None and not isinstance(settings, CloudSettings):  # CloudClient("host:port") failed later
            raise ConfigError(f"must be CloudSettings, got {type(settings).__name__}: pass address=... and the other "
                              "settings as keywords", field="settings")
        known = {f.name for f in dataclasses.fields(CloudSettings)}
        for name in fields:  # a misspelt keyword was a bare TypeError from the dataclass
            if name not in known:
                raise ConfigError(f"unknown setting (the [cloud] settings are {', '.join(sorted(known))})",
                                  field=f"cloud.{name}")
        if settings is None:
            settings = CloudSettings(**fields)
        elif fields:
            settings = dataclasses.replace(settings, **fields)
        self.settings = settings
        self._token_stamp = self._token_file_stamp()  # first: a change while the token is read is seen later
        self._token = settings.resolve_token()
        self.has_token = bool(self._token)  # the bridge refuses calls without one (the daemon warns at start)
        self._channel = channel if channel is not None else open_channel(settings)
        self._stub = bridge_pb2_grpc.CloudBridgeStub(self._channel)
        self._closed = False
        self._clock = clock
        self._closing = threading.Event()
        # by default a retry's wait ends at close(), not the whole backoff later
        self._sleep = sleep if sleep is not None else self._closing.wait
        self._rng = rng or random.Random()
        self.circuit = CircuitBreaker(settings.circuit_failure_threshold, settings.circuit_cooldown_s, clock=clock)
        # until when this device's own quota at the bridge is spent, as the bridge said (clock seconds; 0: not)
        self._quota_until_s = 0.0

    # --- plumbing --------------------------------------------------------------------------------------

    def _token_file_stamp(self) -> tuple[int, ...] | None:
        path = self.settings.token_file
        if path is None or self.settings.token:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        # ctime and mode too: a chmod 600 after a refused rotation must be seen
        return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode

    def _metadata(self) -> list[tuple[str, str]]:
        # a token file rotated on disk (the bridge revoked the old token) is read again, not only at start
        stamp = self._token_file_stamp()
        if stamp is not None and stamp != self._token_stamp:
            try:
                token = self.settings.resolve_token()
                if not token:  # caught between a truncation and the write: not a token to send
                    raise ConfigError("the file is empty", field="cloud.token_file")
                self._token, self.has_token = token, True
            except ConfigError as err:  # half-written, or made readable by others: keep the token we have
                log.warning("cannot read the rotated token file: %s", err)
            self._token_stamp = stamp
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    def _closed_error(self) -> CloudError:
        # grpc's own error for a closed channel is a bare ValueError (and a new stub on one crashes); neutral
        # for the circuit (the code is not a bridge outage's)
        return CloudError("the cloud client is closed", code="CLOSED")

    def _enter_circuit(self, *, generation: bool = True) -> int:
        """Let a call through the circuit breaker; what :meth:`CircuitBreaker.admit` returned (0, or a probe's number).

        ``generation``: the call spends the device's quota (ListModels does not)."""
        if self._closed:
            raise self._closed_error()
        wait_s = self._quota_until_s - self._clock()
        if generation and wait_s > 0:
            # the bridge said when this device's quota allows a call again: a call before then is refused the same
            error = CloudQuotaError(f"cloud skipped: this device's quota at the bridge is spent; next try in {wait_s:.1f} s",
                                    code="RESOURCE_EXHAUSTED", retry_after_s=wait_s, reason=QUOTA_EXCEEDED)
            error.skipped = True
            raise error
        kind = self.circuit.admit()
        if kind is None:
            wait_s = self.circuit.retry_after_s()
            # past the cool-down the circuit is half-open: one call is testing the bridge, and "next try in
            # 0.0 s" would promise a call that is refused too until that test ends
            when = f"next try in {wait_s:.1f} s" if wait_s > 0 else "one call is testing the bridge now"
            raise CircuitOpenError(f"cloud skipped: {self.circuit.consecutive_failures} consecutive failures; {when}",
                                   code="CIRCUIT_OPEN")
        return kind

    def _record(self, error: CloudError | None, *, cut_short: bool = False, probe: int | None = None) -> None:
        """Tell the circuit breaker how a call ended; ``cut_short``: it ran out of the caller's shorter deadline;
        ``probe``: what the call's admission returned (see :meth:`CircuitBreaker.admit`)."""
        if error is None:
            self.circuit.record_success()
        elif isinstance(error, CloudQuotaError) and error.reason == QUOTA_EXCEEDED:
            # this device's quota is spent; the bridge is healthy and serves other devices: not an outage
            if error.retry_after_s:
                # at most a few minutes: a quota an operator raised (or reset by a restart) is found again then
                skip_s = min(error.retry_after_s, _MAX_QUOTA_SKIP_S)
                self._quota_until_s = max(self._quota_until_s, self._clock() + skip_s)
            self.circuit.record_neutral(probe=probe)
        elif isinstance(error, _NEUTRAL_ERRORS) or cut_short:
            self.circuit.record_neutral(probe=probe)
        elif error.code in _CIRCUIT_CODE_NAMES or isinstance(error, (CloudUnavailableError, CloudTimeoutError)):
            self.circuit.record_failure(probe=probe)
        else:  # a bad request or token says nothing about the bridge's health
            self.circuit.record_neutral(probe=probe)

    def _backoff_s(self, attempt: int) -> float:
        s = self.settings
        delay = min(s.backoff_max_s, s.backoff_initial_s * s.backoff_multiplier**attempt)
        return delay * (1.0 - s.jitter * self._rng.random())

    def _cut_short(self, error: CloudError, timeout_s: float | None, deadline_s: float) -> bool:
        """Did ``error`` come from a deadline the caller chose shorter than ``settings.timeout_s``, expiring
        on a bridge that had accepted the call?

        Then the caller's own clock ended the call (a daemon request's deadline, say), and a healthy bridge
        would have been cut off just the same. A timeout well before that deadline (an upstream's, relayed by
        the bridge) still counts against the bridge, and so does one where the bridge never accepted the call
        (a hung process, or a host that takes connections and never answers: it must still open the circuit).
        """
        return (
            isinstance(error, CloudTimeoutError)
            and error.bridge_accepted
            and timeout_s is not None
            and timeout_s < self.settings.timeout_s
            and self._clock() >= deadline_s - _DEADLINE_SLACK_S
        )

    def _retry_delay_s(self, err: grpc.RpcError, attempt: int, deadline_s: float) -> tuple[float | None, CloudError]:
        """How long to wait before the next attempt, or None to give up; and the error to raise if giving up."""
        details = status_details(err)
        accepted = _bridge_accepted(err)
        # the TLS hint is for a handshake the bridge refused, not for a bridge that died during a call
        error = translate_rpc_error(err, details, tls=None if accepted else not self.settings.insecure,
                                    client_cert=self.settings.cert_file is not None)
        error.bridge_accepted = accepted  # read by _cut_short
        code = err.code() if isinstance(err, grpc.Call) else None
        # Every failure the bridge itself reports after taking a call says why in an ErrorInfo. Without one, the
        # connection broke or the bridge stopped while its backend generated: the bridge bills what was generated
        # until then, and another try would be generated and billed again.
        error.lost = accepted and not details.reason and code != grpc.StatusCode.DEADLINE_EXCEEDED
        # a request or an answer over gRPC's message size limit is RESOURCE_EXHAUSTED too, and fails the same again;
        # a failure the bridge billed (an answer it could not use) would be generated and billed again
        retryable = (code in RETRYABLE_CODES and not isinstance(error, _NEUTRAL_ERRORS) and error.billed is None
                     and not error.lost)
        if not retryable or attempt + 1 >= self.settings.max_attempts:
            return None, error
        if details.retry_after_s is not None:
            # the bridge said when; a little jitter keeps devices refused together from returning together. Never
            # sooner than the backoff: an upstream's "Retry-After: 0" on a 429 sent the attempts 4 ms apart
            delay = max(details.retry_after_s * (1.0 + 0.1 * self.settings.jitter * self._rng.random()),
                        self._backoff_s(attempt))
        else:
            delay = self._backoff_s(attempt)
        if self._clock() + delay >= deadline_s:
            return None, error  # the retry could not finish in time: say so now instead of sleeping
        return delay, error

    def _pause(self, delay_s: float, cancel: Callable[[], bool] | None) -> None:
        """Sleep before a retry; with ``cancel``, in short steps, so a caller who gives up need not wait it out."""
        if cancel is None:
            self._sleep(delay_s)
            return
        left = delay_s
        while left > 0:  # counts the steps, not the clock: the clock seam need not move when sleeping
            _raise_if_cancelled(cancel)
            step = min(_CANCEL_POLL_S, left)
            self._sleep(step)
            left -= step

    def _deadline(self, timeout_s: float | None) -> tuple[float, float]:
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not 0 < timeout_s <= MAX_SECONDS):  # also refuses nan
            # a day at most, as the settings' timeout_s: gRPC fails a farther deadline at once, as a timeout
            raise InvalidRequestError(f"must be a number of seconds > 0 and at most {MAX_SECONDS:.0f}, got "
                                      f"{timeout_s!r:.40}", field="timeout_s")
        start = self._clock()
        return start, start + (self.settings.timeout_s if timeout_s is None else timeout_s)

    def _unary(self, invoke: Callable[[float], T], timeout_s: float | None, *,
               generation: bool = True, circuit: bool = True) -> tuple[T, float, float, int]:
        """Run ``invoke(remaining_s)`` with retries; returns (response, latency_ms, round_trip_ms, attempts).

        ``circuit=False``: the call neither waits for the circuit breaker nor tells it how it ended (see
        :meth:`list_models`)."""
        # the argument first: a half-open circuit's probe taken by a call refused for its timeout_s was never given
        # back, and every later call was skipped as "one call is testing the bridge now"
        start, deadline_s = self._deadline(timeout_s)
        if circuit:
            probe = self._enter_circuit(generation=generation)
        elif self._closed:
            raise self._closed_error()
        else:
            probe = 0
        # what a call outside the circuit tells it: nothing
        record, neutral = (self._record, self.circuit.record_neutral) if circuit else (_ignore, _ignore)
        attempt = 0
        try:
            while True:
                remaining = deadline_s - self._clock()
                if remaining <= 0:
                    raise CloudTimeoutError(
                        f"cloud bridge: no answer within {deadline_s - start:.2f} s", code="DEADLINE_EXCEEDED"
                    )
                sent = self._clock()
                try:
                    if self._closed:  # closed by another thread during a retry's backoff
                        raise self._closed_error()
                    response = invoke(remaining)
                except ValueError as err:
                    if self._closed:  # closed by another thread while the call was made
                        raise self._closed_error() from err
                    raise
                except grpc.RpcError as err:
                    if self._closed:  # the channel closed under the call by another thread: not a bridge outage
                        raise self._closed_error() from err
                    delay, error = self._retry_delay_s(err, attempt, deadline_s)
                    if delay is None:
                        raise error from err
                    self._sleep(delay)
                    attempt += 1
                    continue
                now = self._clock()
                record(None)
                return response, (now - start) * 1000.0, (now - sent) * 1000.0, attempt + 1
        except CloudError as err:
            record(err, cut_short=self._cut_short(err, timeout_s, deadline_s), probe=probe)
            raise
        except BaseException:
            neutral(probe=probe)
            raise

    # --- the API ---------------------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[Message],
        *,
        params: SamplingParams | None = None,
        model: str | None = None,
        escalation: Escalation | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        max_prices: tuple[float, float] | None = None,
        default_length: bool = False,
    ) -> CloudResult:
        """One complete answer from the bridge. ``params=None`` takes the bridge's defaults. ``max_prices``: the
        (input, output) USD per million tokens the call was budgeted at; a bridge whose price is higher refuses it
        (CloudPriceError, nothing billed). ``default_length``: ask for the bridge's default length, which it fits to
        its model's window, instead of ``params.max_new_tokens`` (a default the caller did not choose)."""
        req = self._request(messages, params, model, escalation, request_id, max_prices, default_length)
        response, latency_ms, rtt_ms, attempts = self._unary(
            lambda remaining: self._stub.Generate(req, timeout=remaining, metadata=self._metadata()), timeout_s
        )
        return _result(response, latency_ms=latency_ms, round_trip_ms=rtt_ms, attempts=attempts)

    def stream(
        self,
        messages: Sequence[Message],
        *,
        params: SamplingParams | None = None,
        model: str | None = None,
        escalation: Escalation | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        cancel: Callable[[], bool] | None = None,
        max_prices: tuple[float, float] | None = None,
        default_length: bool = False,
    ) -> Iterator[CloudChunk]:
        """The answer as it is generated; the last chunk has ``result``. Closing the iterator cancels the call.

        Nothing is sent before the first ``next()``; CircuitOpenError is raised there. ``cancel`` is polled
        (from another thread while the call waits for the bridge, so it must be thread-safe); once it returns
        True the call is cancelled within about 0.1 s and CloudCancelledError raised, never retried.
        ``max_prices`` and ``default_length`` as for :meth:`generate`.
        """
        req = self._request(messages, params, model, escalation, request_id, max_prices, default_length)
        return self._stream(req, timeout_s, cancel)

    def _request(self, messages: Sequence[Message], params: SamplingParams | None, model: str | None,
                 escalation: Escalation | None, request_id: str | None,
                 max_prices: tuple[float, float] | None = None,
                 default_length: bool = False) -> bridge_pb2.GenerateRequest:
        # the caller's mistakes as errors naming the argument (a str for messages failed as an AttributeError)
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise InvalidRequestError(f"must be a list of messages, got {type(messages).__name__}", field="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise InvalidRequestError(f"must be a mapping with role and content, got {type(m).__name__}",
                                          field=f"messages[{i}]")
        # normalised as the engine and the runtime read them: OpenAI's content parts joined into their text (the
        # list's Python repr was sent, and billed, as the prompt), a missing role or a content of None refused
        messages = validate_messages(messages)
        for name, value, kind in (("params", params, SamplingParams), ("escalation", escalation, Escalation)):
            if value is not None and not isinstance(value, kind):
                raise InvalidRequestError(f"must be a {kind.__name__} or None, got {type(value).__name__}", field=name)
        for name, value in (("model", model), ("request_id", request_id)):
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(f"must be a string, got {type(value).__name__}", field=name)
        if max_prices is not None and not (
                isinstance(max_prices, (tuple, list)) and len(max_prices) == 2
                and all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p >= 0
                        for p in max_prices)):
            raise InvalidRequestError("must be two prices >= 0 (USD per million input and output tokens)",
                                      field="max_prices")
        req = _request(
            messages,
            model=self.settings.model if model is None else model,
            params=params,
            escalation=escalation,
            request_id=request_id or uuid.uuid4().hex,
            max_prices=max_prices,
        )
        if default_length:  # unset: the bridge's default, fitted to what the prompt leaves of its model's window
            req.ClearField("max_new_tokens")
        return req

    def _stream(
        self, req: bridge_pb2.GenerateRequest, timeout_s: float | None, cancel: Callable[[], bool] | None
    ) -> Iterator[CloudChunk]:
        start, deadline_s = self._deadline(timeout_s)  # before the circuit, as in _unary
        probe = self._enter_circuit()
        attempt = 0
        outcome: BaseException | None = None
        finished = False
        try:
            while True:
                _raise_if_cancelled(cancel)
                remaining = deadline_s - self._clock()
                if remaining <= 0:
                    raise CloudTimeoutError(
                        f"cloud bridge: no answer within {deadline_s - start:.2f} s", code="DEADLINE_EXCEEDED"
                    )
                sent = self._clock()
                if self._closed:  # closed by another thread during a retry's backoff
                    raise self._closed_error()
                try:
                    call = self._stub.GenerateStream(req, timeout=remaining, metadata=self._metadata())
                except ValueError as err:
                    if self._closed:
                        raise self._closed_error() from err
                    raise
                watcher = _CancelWatcher(call, cancel)
                delivered = False
                try:
                    for message in call:
                        if message.HasField("delta"):
                            delivered = True
                            yield CloudChunk(message.delta.text, message.delta.token_count)
                            _raise_if_cancelled(cancel)  # cancelled between chunks: no more text, not even one
                        elif message.HasField("final"):
                            now = self._clock()
                            result = _result(
                                message.final,
                                latency_ms=(now - start) * 1000.0,
                                round_trip_ms=(now - sent) * 1000.0,
                                attempts=attempt + 1,
                            )
                            finished = True
                            yield CloudChunk("", 0, result)
                            return
                    raise CloudUnavailableError(
                        "cloud bridge: the stream ended without a final message", code="DATA_LOSS"
                    )
                except ValueError as err:
                    if self._closed:  # closed by another thread while the answer streamed
                        raise self._closed_error() from err
                    raise
                except grpc.RpcError as err:
                    if self._closed:  # "Channel closed!" under the stream by another thread: not a bridge outage
                        raise self._closed_error() from err
                    if watcher.fired:  # the CANCELLED status of our own call.cancel(), not the bridge's doing
                        cancelled = _cancelled_error()
                        # whether the bridge had taken it (and may bill what it generated until the cancel)
                        cancelled.bridge_accepted = _bridge_accepted(call)
                        raise cancelled from err
                    delay, error = self._retry_delay_s(err, attempt, deadline_s)
                    if delay is None or delivered:  # text already shown cannot be taken back: no retry
                        raise error from err
                    self._pause(delay, cancel)
                    attempt += 1
                finally:
                    watcher.stop()
                    # a no-op when the call is over; stops the bridge's generation when the caller left early
                    call.cancel()
        except GeneratorExit:
            outcome = GeneratorExit()
            raise
        except CloudError as err:
            outcome = err
            raise
        finally:
            if finished:
                self._record(None)
            elif isinstance(outcome, CloudError):
                self._record(outcome, cut_short=self._cut_short(outcome, timeout_s, deadline_s), probe=probe)
            else:
                self.circuit.record_neutral(probe=probe)

    def list_models(self, *, timeout_s: float | None = None, circuit: bool = True) -> list[ModelInfo]:
        """The bridge's models with their limits and prices.

        ``circuit=False`` (a background read of the limits, not a request's): the call is made while the circuit is
        open, and how it ends does not count toward opening or closing it. A read that failed in an outage opened
        the circuit sooner than the escalations alone would have, and one made in a half-open circuit took the probe
        meant for an escalation."""
        response, *_ = self._unary(
            lambda remaining: self._stub.ListModels(
                bridge_pb2.ListModelsRequest(), timeout=remaining, metadata=self._metadata()
            ),
            timeout_s,
            generation=False,  # not charged to the device's quota: a spent quota does not stop it
            circuit=circuit,
        )
        return [
            ModelInfo(
                alias=m.alias,
                backend=m.backend,
                model=m.model,
                context_length=m.context_length,
                max_new_tokens_limit=m.max_new_tokens_limit,
                usd_per_million_input_tokens=m.usd_per_million_input_tokens,
                usd_per_million_output_tokens=m.usd_per_million_output_tokens,
                is_default=m.is_default,
                revision=m.revision,
                bundle_revision=m.bundle_revision,
            )
            for m in response.models
        ]

    def check_health(self, *, timeout_s: float = 2.0, service: str = SERVICE_NAME) -> bool:
        """True if the bridge answers its standard health check with SERVING. Does not touch the circuit."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._deadline(timeout_s)  # the calls' own check of timeout_s
        if not isinstance(service, str):
            raise InvalidRequestError(f"must be a string, got {type(service).__name__}", field="service")
        if self._closed:  # grpcio crashes the process on a stub made for a closed channel
            return False
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        """Close the channel; calls made after it raise CloudError (code ``CLOSED``), health checks answer False."""
        self._closed = True
        self._closing.set()
        self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the token
        return f"CloudClient(address={self.settings.address!r}, circuit={self.circuit.state})"
