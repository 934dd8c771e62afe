"""The CloudBridge servicer: authenticate, validate, apply quotas, queue, generate, price, answer.

Every call runs the same steps; anything that ends a call early is a
:class:`~cloud_bridge._status.Reject` carrying the status to send, so the
steps read top to bottom. The generation runs in the gRPC handler thread and
watches a :class:`CancelToken` that fires when the call is cancelled or its
deadline passes, so an abandoned call stops its backend.
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc

from edge_runtime._grpc_decode import Undecodable, undecodable_message
from edge_runtime._proto.edgecloud.v1 import bridge_pb2, bridge_pb2_grpc
from edge_runtime.cloud import ACCEPTED_METADATA_KEY, Escalation
from edge_runtime.engine.types import (
    SamplingParams,
    check_api_temperature,
    is_plain_request_id,
    log_text,
    validate_messages,
)
from edge_runtime.errors import BackendError, ContextLengthError, InvalidRequestError, QueueFullError

from ._admission import WorkerSlots
from ._auth import TokenStore, bearer_token
from ._quota import QuotaManager
from ._settings import BridgeSettings, ModelSettings
from ._status import Reject, bad_request, bill_metadata, error_info, make_status, quota_failure, retry_info, with_metadata
from .backends import (
    Backend,
    BackendChunk,
    BackendRequest,
    BackendResult,
    CancelToken,
    UnusableAnswerError,
    estimated_tokens,
)

__all__ = ["BridgeService", "FINISH_REASONS"]

log = logging.getLogger("cloud_bridge.access")
content_log = logging.getLogger("cloud_bridge.content")

FINISH_REASONS: dict[str, bridge_pb2.FinishReason] = {
    "stop": bridge_pb2.FINISH_REASON_STOP,
    "eos": bridge_pb2.FINISH_REASON_EOS,
    "length": bridge_pb2.FINISH_REASON_LENGTH,
    "cancelled": bridge_pb2.FINISH_REASON_CANCELLED,
    "content_filter": bridge_pb2.FINISH_REASON_CONTENT_FILTER,
}
_MAX_REQUEST_ID = 128


@dataclass
class _Job:
    device: str
    alias: str
    model: ModelSettings
    backend: Backend
    slots: WorkerSlots
    request: BackendRequest
    received_s: float
    cancel: CancelToken
    queue_ms: float = 0.0
    started_s: float = 0.0
    generate_ms: float = 0.0
    billed: bool = False  # charged to the device's quota and written to the access log
    refunded: bool = False  # the request taken from the device's quota was given back
    peer: str = ""  # the caller's address, read while the call is live (an ended call's context has none)


def _invalid(err: InvalidRequestError) -> Reject:
    field = err.field or ""
    message = str(err)
    description = message[len(field) + 2 :] if field and message.startswith(f"{field}: ") else message
    details = [bad_request(field, description)]
    if isinstance(err, ContextLengthError):  # the reason the daemon sends too: a client can tell it by machine
        details.append(error_info("CONTEXT_LENGTH_EXCEEDED"))
    return Reject(make_status(grpc.StatusCode.INVALID_ARGUMENT, message, *details))


# what a call refused at server.max_concurrent_rpcs is told to wait: calls last seconds, and the device's
# backoff spreads the retries
_BUSY_RETRY_S = 1.0
# the most tokens a chat template adds per message and around the whole prompt (role markers, a default system
# prompt); generous: the bound below is only there to catch usage figures no request could have
_TEMPLATE_TOKENS_PER_MESSAGE = 32
_TEMPLATE_TOKENS = 256
# what an upstream may bill beyond the max_tokens it was sent: some reasoning models count their hidden reasoning
# outside it
_REASONING_TOKENS = 32_768


def _quota_tokens(request: BackendRequest, prompt_tokens: int, completion_tokens: int) -> int:
    """The tokens to charge a device's quota for a call the upstream reported as ``prompt_tokens`` +
    ``completion_tokens``, at most what the request could have used.

    A tokenizer makes at most one token per byte of text, plus its template's markers, and an upstream generates
    the ``max_new_tokens`` it was asked for plus, for some reasoning models, a hidden reasoning budget: an upstream
    (or a proxy in front of it) that reports more would otherwise lock the device out of its token quota for
    days. The bill and the access log keep the upstream's own figures; the clamp is logged.
    """
    prompt_bytes = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in request.messages)
    prompt_cap = prompt_bytes + _TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + _TEMPLATE_TOKENS
    completion_cap = request.params.max_new_tokens + _REASONING_TOKENS
    charged = min(prompt_tokens, prompt_cap) + min(completion_tokens, completion_cap)
    if charged < prompt_tokens + completion_tokens:
        log.warning("%s: the upstream reported prompt_tokens=%d completion_tokens=%d, more than the request can "
                    "have (at most %d and %d): the device's token quota is charged %d", _log_id(request.request_id),
                    prompt_tokens, completion_tokens, prompt_cap, completion_cap, charged)
    return charged


class BridgeService(bridge_pb2_grpc.CloudBridgeServicer):
    def __init__(
        self,
        settings: BridgeSettings,
        backends: Mapping[str, Backend],
        tokens: TokenStore,
        quotas: QuotaManager,
    ) -> None:
        self.settings = settings
        self.backends = dict(backends)
        self.tokens = tokens
        self.quotas = quotas
        self.slots = {
            alias: WorkerSlots(settings.models[alias].workers, settings.models[alias].queue_size)
            for alias in self.backends
        }
        # generation calls in progress, all models together. Counted here rather than by gRPC's own
        # maximum_concurrent_rpcs, which counted health checks and ListModels too: a busy bridge looked dead
        self._calls = threading.BoundedSemaphore(settings.server.max_concurrent_rpcs)
        # set by the server when its stop cuts the calls still running: they are billed as the bridge's doing, not
        # as calls their devices cancelled
        self.stopping = threading.Event()

    @contextlib.contextmanager
    def _call_slot(self) -> Iterator[None]:
        if not self._calls.acquire(blocking=False):
            limit = self.settings.server.max_concurrent_rpcs
            raise Reject(make_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     f"the bridge has {limit} calls in progress, its limit (server.max_concurrent_rpcs)",
                                     retry_info(_BUSY_RETRY_S), error_info("BRIDGE_BUSY", {"limit": str(limit)})))
        try:
            yield
        finally:
            self._calls.release()

    # --- the steps -------------------------------------------------------------------------------------

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        device = self.tokens.authenticate(bearer_token(context.invocation_metadata()))
        if device is None:
            # one message for missing and wrong tokens: nothing to learn from the difference
            raise Reject(
                make_status(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or invalid device token", error_info("INVALID_TOKEN")
                )
            )
        return device

    def _parse(self, request: bridge_pb2.GenerateRequest, device: str) -> tuple[str, BackendRequest]:
        limits = self.settings.limits
        try:
            request_id = request.request_id or uuid.uuid4().hex
            if not _valid_request_id(request_id):
                raise InvalidRequestError(f"must be at most {_MAX_REQUEST_ID} printable characters", field="request_id")
            alias = request.model or self.settings.default_model
            if alias not in self.backends:
                raise Reject(
                    make_status(
                        grpc.StatusCode.NOT_FOUND,
                        # the client's string is cut: gRPC drops a status whose trailers pass 16 KiB
                        f"no model alias {alias[:64]!r}{'...' if len(alias) > 64 else ''} "
                        f"(have: {', '.join(self.backends)})",
                        error_info("MODEL_NOT_FOUND", {"model": alias[:64]}),
                    )
                )
            model = self.settings.models[alias]
            self._check_price_limits(request, alias, model)
            if len(request.messages) > limits.max_messages:
                raise InvalidRequestError(f"at most {limits.max_messages} messages", field="messages")
            messages = validate_messages([{"role": m.role, "content": m.content} for m in request.messages])
            escalation = None
            if request.HasField("escalation"):
                e = request.escalation
                p_correct = e.p_correct if e.HasField("p_correct") else None
                if p_correct is not None and not 0.0 <= p_correct <= 1.0:
                    raise InvalidRequestError(f"must be in [0, 1], got {p_correct}", field="escalation.p_correct")
                escalation = Escalation(
                    draft_answer=e.draft_answer,
                    p_correct=p_correct,
                    reason=e.reason,
                    policy=e.policy,
                    local_model=e.local_model,
                )
            chars = sum(len(m["content"]) for m in messages)
            if chars > limits.max_prompt_chars:
                raise InvalidRequestError(
                    f"the request has {chars} characters; at most {limits.max_prompt_chars} are accepted",
                    field="messages",
                )
            if escalation is not None:  # the hint pastes all of these into the model's prompt
                context = sum(map(len, (escalation.reason, escalation.policy, escalation.local_model)))
                if chars + context > limits.max_prompt_chars:
                    raise InvalidRequestError(
                        f"the messages' {chars} characters and the escalation's {context} are more than the "
                        f"{limits.max_prompt_chars} accepted", field="escalation")
                if chars + context + len(escalation.draft_answer) > limits.max_prompt_chars:
                    # the device's draft is a hint, the messages are the question: a long draft beside a question
                    # that fits refused every escalation of it (the device cannot know the limit). Answered without
                    # the draft; the id written as every line writes it (_log_id): written raw, one with spaces
                    # added key=value fields (device=..., cost_usd=...) to the access log, the bill's source
                    log.info("request %s: the escalation's draft (%d characters) left out: with it the request "
                             "passes max_prompt_chars (%d)", _log_id(request_id), len(escalation.draft_answer),
                             limits.max_prompt_chars)
                    escalation = replace(escalation, draft_answer="")
            cap = min(limits.max_new_tokens, model.max_new_tokens or limits.max_new_tokens)
            default_length = not request.HasField("max_new_tokens")
            if not default_length:
                max_new_tokens = request.max_new_tokens
                if not 1 <= max_new_tokens <= cap:
                    raise InvalidRequestError(f"must be in [1, {cap}], got {max_new_tokens}", field="max_new_tokens")
            else:
                max_new_tokens = min(limits.default_max_new_tokens, cap)
            params = self._params(request.sampling, max_new_tokens)
        except InvalidRequestError as err:
            raise _invalid(err) from err
        if escalation is not None and model.escalation_hint and escalation.draft_answer:
            messages = _with_hint(messages, escalation)
        return alias, BackendRequest(request_id, messages, params, escalation, default_length=default_length)

    @staticmethod
    def _check_price_limits(request: bridge_pb2.GenerateRequest, alias: str, model: ModelSettings) -> None:
        """Refuse a call priced above what the device budgeted it at (its prices may be up to 10 minutes old):
        before anything is generated, so nothing is billed, and with the current prices for the device to use."""
        prices = {"input": model.usd_per_million_input_tokens, "output": model.usd_per_million_output_tokens}
        for kind, price in prices.items():
            field = f"max_usd_per_million_{kind}_tokens"
            if not request.HasField(field):
                continue
            limit = getattr(request, field)
            if not math.isfinite(limit) or limit < 0:
                raise InvalidRequestError(f"must be a finite price >= 0, got {limit!r}", field=field)
            if price > limit * (1 + 1e-9) + 1e-12:  # prices read back from ListModels's doubles compare equal
                raise Reject(make_status(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{alias!r} costs ${price:g} per million {kind} tokens, above this request's limit of "
                    f"${limit:g}: its prices changed; read them again (ListModels)",
                    error_info("PRICE_ABOVE_LIMIT", {"model_alias": alias,
                                                     "usd_per_million_input_tokens": repr(prices["input"]),
                                                     "usd_per_million_output_tokens": repr(prices["output"])}),
                ))

    @staticmethod
    def _params(s: bridge_pb2.SamplingParams, max_new_tokens: int) -> SamplingParams:
        try:
            if s.HasField("temperature"):  # the daemon's range: a device gets the same answer from either
                check_api_temperature(s.temperature)
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=s.temperature if s.HasField("temperature") else 0.0,
                top_p=s.top_p if s.HasField("top_p") else 1.0,
                top_k=s.top_k if s.HasField("top_k") else 0,
                seed=s.seed if s.HasField("seed") else None,
                stop=tuple(s.stop),
            )
        except InvalidRequestError as err:
            field = err.field if err.field == "max_new_tokens" else f"sampling.{err.field}"
            raise InvalidRequestError(str(err).split(": ", 1)[-1], field=field) from err

    def _admit(self, device: str) -> None:
        rejection = self.quotas.admit(device)
        if rejection is not None:
            raise Reject(
                make_status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"quota {rejection.limit} exceeded for this device; retry in {rejection.retry_after_s:.2f} s",
                    retry_info(rejection.retry_after_s),
                    quota_failure(f"device:{device}", rejection.limit),
                    error_info("QUOTA_EXCEEDED", {"limit": rejection.limit}),
                )
            )

    def _prepare(self, request: bridge_pb2.GenerateRequest, context: grpc.ServicerContext) -> _Job:
        received_s = time.monotonic()
        device = self._authenticate(context)
        try:
            alias, backend_request = self._parse(request, device)
            self._admit(device)
        except Reject as reject:
            # the id goes into the log only once the caller is authenticated and the id is valid:
            # an anonymous caller must not be able to write into the bridge's log
            if request.request_id and _valid_request_id(request.request_id):
                reject.request_id = request.request_id
            reject.device = device
            raise
        # tell the device now that a live bridge has the call: a deadline of its own that then expires
        # says nothing against the bridge's health (see CloudClient._cut_short)
        context.send_initial_metadata(((ACCEPTED_METADATA_KEY, "1"),))
        remaining = context.time_remaining()
        cancel = CancelToken(None if remaining is None else received_s + remaining)
        # fires when the call ends for any reason: cancelled, deadline passed, or done
        if not context.add_callback(cancel.cancel):  # the call already ended
            cancel.cancel()
        return _Job(
            device,
            alias,
            self.settings.models[alias],
            self.backends[alias],
            self.slots[alias],
            backend_request,
            received_s,
            cancel,
            peer=context.peer(),
        )

    def _run(self, job: _Job, *, stream: bool) -> Iterator[BackendChunk]:
        """The backend's chunks; the last one carries the result. Releases the worker slot however it ends."""
        try:
            if not job.slots.acquire(job.cancel):
                # the call ended while it waited (cancelled, or out of time) and never reached the backend: the
                # request it took from the device's quota bought nothing
                self._refund_request(job)
                if job.cancel.expired:
                    # the caller's deadline, seen here a moment before the caller's own clock: said as a deadline,
                    # which the device does not count against the bridge (CANCELLED opened its circuit breaker)
                    raise Reject(make_status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                             "the call's deadline passed while it waited for a worker"))
                raise Reject(make_status(grpc.StatusCode.CANCELLED, "call ended while waiting for a worker"))
        except QueueFullError as err:
            self._refund_request(job)  # the bridge's capacity, not the device's quota, said no
            raise Reject(
                make_status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"model {job.alias!r} is busy: {err}",
                    retry_info(err.retry_after_s),
                    error_info("QUEUE_FULL", {"model_alias": job.alias}),
                )
            ) from err
        started_s = job.started_s = time.monotonic()
        job.queue_ms = (started_s - job.received_s) * 1000.0
        try:
            chunks = (
                job.backend.stream(job.request, job.cancel)
                if stream
                else iter([BackendChunk("", 0, job.backend.generate(job.request, job.cancel))])
            )
            for chunk in chunks:
                if chunk.result is not None and (job.cancel() or chunk.result.finish_reason == "cancelled"):
                    # the caller is gone or out of time: a cut-off answer is no answer, billed all the same (an
                    # upstream bills what it generated)
                    expired = job.cancel.expired
                    self._bill_cut_call(job, "deadline_exceeded" if expired else "cancelled_by_caller",
                                        chunk.result.prompt_tokens, chunk.result.completion_tokens)
                    raise Reject(
                        make_status(
                            grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED,
                            f"generation stopped after {chunk.result.completion_tokens} tokens: the call "
                            f"{'ran out of time' if expired else 'was cancelled'}",
                        )
                    )
                yield chunk
        except Reject:
            raise
        except InvalidRequestError as err:
            raise _invalid(err) from err
        except BackendError as err:
            metadata = {"model_alias": job.alias, "backend": job.backend.kind}
            if isinstance(err, UnusableAnswerError):
                # the upstream answered and billed, the bridge cannot use the answer: the device gets the error, and
                # its quota and the access log count the answer, as they count a stream that failed mid-way; the
                # error says the bill, which the device counts too (its budget, its result's cost)
                metadata.update(self._bill_cut_call(job, "backend_failed", err.prompt_tokens, err.completion_tokens,
                                                    estimated=err.prompt_estimated))
            details = [error_info(err.reason, metadata)]
            if err.retry_after_s is not None:
                details.append(retry_info(err.retry_after_s))
            code = getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNAVAILABLE)
            raise Reject(make_status(code, f"backend {job.alias!r} failed: {err}", *details)) from err
        except Exception as err:  # a broken backend must cost one call, never the server
            log.exception("%s backend %r crashed", _log_id(job.request.request_id), job.alias)
            raise Reject(
                make_status(
                    grpc.StatusCode.UNAVAILABLE,
                    f"backend {job.alias!r} failed: {type(err).__name__}",
                    error_info("BACKEND_CRASHED", {"model_alias": job.alias, "backend": job.backend.kind}),
                )
            ) from err
        finally:
            job.generate_ms = (time.monotonic() - started_s) * 1000.0
            job.slots.release(job.generate_ms / 1000.0)

    def _refund_request(self, job: _Job) -> None:
        """Give the device back the request :meth:`_admit` took for a call no backend ran, once per call."""
        if job.refunded or job.started_s:
            return
        self.quotas.refund_request(job.device)
        job.refunded = True

    def _bill_cut_call(self, job: _Job, finish: str, prompt_tokens: int, completion_tokens: int, *,
                       estimated: bool = False) -> dict[str, str]:
        """Bill a call that ended without its answer (cut by its caller, failed, unusable): what was generated is
        charged to the device's token quota and written to the access line all the same, once per call. The line has
        a finished call's keys, logfmt-readable ("prompt_tokens~12" was no key=value); ``estimated``: the prompt's
        tokens are the bridge's estimate (the backend never said). Returns the bill as ErrorInfo metadata for the
        device (none when the call was billed already)."""
        if job.billed:
            return {}
        if finish == "cancelled_by_caller" and self.stopping.is_set():
            finish = "bridge_stopped"
        self.quotas.charge_tokens(job.device, _quota_tokens(job.request, prompt_tokens, completion_tokens))
        job.billed = True
        cost = job.model.cost_usd(prompt_tokens, completion_tokens)
        log.info("%s device=%s model=%s finish=%s prompt_tokens=%d%s completion_tokens=%d cost_usd=%.12f "
                 "queue_ms=%.1f total_ms=%.1f", _log_id(job.request.request_id), job.device, job.alias, finish,
                 prompt_tokens, " prompt_tokens_estimated=true" if estimated else "", completion_tokens,
                 cost, job.queue_ms, (time.monotonic() - job.received_s) * 1000.0)
        return bill_metadata(cost, prompt_tokens, completion_tokens)

    def _response(self, job: _Job, result: BackendResult) -> bridge_pb2.GenerateResponse:
        now_s = time.monotonic()
        total_ms = (now_s - job.received_s) * 1000.0
        # a stream's final message is built while the backend's generator is still open
        generate_ms = job.generate_ms or (now_s - job.started_s) * 1000.0
        cost = job.model.cost_usd(result.prompt_tokens, result.completion_tokens)
        self.quotas.charge_tokens(job.device, _quota_tokens(job.request, result.prompt_tokens, result.completion_tokens))
        job.billed = True
        log.info(
            "%s device=%s model=%s finish=%s prompt_tokens=%d completion_tokens=%d cost_usd=%.12f "
            "queue_ms=%.1f total_ms=%.1f",
            _log_id(job.request.request_id),
            job.device,
            job.alias,
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            cost,
            job.queue_ms,
            total_ms,
        )
        if self.settings.server.log_content:
            content_log.info("%s messages=%r answer=%r", _log_id(job.request.request_id), job.request.messages,
                             result.text)
        return bridge_pb2.GenerateResponse(
            request_id=job.request.request_id,
            text=result.text,
            finish_reason=FINISH_REASONS.get(result.finish_reason, bridge_pb2.FINISH_REASON_UNSPECIFIED),
            usage=bridge_pb2.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            cost_usd=cost,
            model=result.model,
            model_alias=job.alias,
            timings=bridge_pb2.ServerTimings(
                queue_ms=job.queue_ms, ttft_ms=result.ttft_ms or 0.0, generate_ms=generate_ms, total_ms=total_ms
            ),
        )

    def refuse_undecodable(self, request: Undecodable, context: grpc.ServicerContext) -> NoReturn:
        """A request that is not valid protobuf: refused as any bad request is (logged with the caller's address),
        and for a caller without a token, as a caller without a token is."""
        device = "-"
        if not request.method.startswith("/grpc.health."):  # the health check needs no token
            try:
                device = self._authenticate(context)
            except Reject as reject:
                self._abort(context, reject)
        reject = Reject(make_status(grpc.StatusCode.INVALID_ARGUMENT, undecodable_message(request),
                                    error_info("UNDECODABLE_REQUEST")))
        reject.device = device  # the log line names who sent it, as for any other bad request
        self._abort(context, reject)

    def _abort(self, context: grpc.ServicerContext, reject: Reject, job: _Job | None = None) -> NoReturn:
        request_id = job.request.request_id if job is not None else reject.request_id
        device = job.device if job is not None else reject.device
        # the details may quote an upstream's error text: escaped, so it cannot forge log lines. The caller's address
        # says where a revoked or leaked token is still in use (it is the transport's, not the caller's, text); the
        # device and the reason say which devices meet which refusal (one still on old prices, say)
        peer = (job.peer if job is not None else "") or context.peer()
        log.info("%s status=%s peer=%s device=%s reason=%s message=%s", _log_id(request_id), reject.status.code.name,
                 log_text(peer, 200), device, reject.reason, json.dumps((reject.status.details or "")[:1000]))
        context.abort_with_status(reject.status)
        raise AssertionError("abort_with_status returned")  # pragma: no cover - it always raises

    # --- the RPCs --------------------------------------------------------------------------------------

    def Generate(
        self, request: bridge_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> bridge_pb2.GenerateResponse:
        job: _Job | None = None
        try:
            with self._call_slot():
                job = self._prepare(request, context)
                result = None
                for chunk in self._run(job, stream=False):
                    result = chunk.result
                assert result is not None
                return self._response(job, result)
        except Reject as reject:
            self._abort(context, reject, job)

    def GenerateStream(
        self, request: bridge_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[bridge_pb2.GenerateStreamResponse]:
        job: _Job | None = None
        delivered = 0  # tokens the caller has been sent
        try:
            with self._call_slot():
                job = self._prepare(request, context)
                for chunk in self._run(job, stream=True):
                    if chunk.text or chunk.token_count:
                        delivered += chunk.token_count
                        yield bridge_pb2.GenerateStreamResponse(
                            delta=bridge_pb2.TextDelta(text=chunk.text, token_count=chunk.token_count)
                        )
                    if chunk.result is not None:
                        final = self._response(job, chunk.result)  # charges and logs the call
                        yield bridge_pb2.GenerateStreamResponse(final=final)
                        return
                raise Reject(
                    make_status(
                        grpc.StatusCode.UNAVAILABLE,
                        f"backend {job.alias!r} ended its stream without a result",
                        error_info("BACKEND_CRASHED", {"model_alias": job.alias}),
                    )
                )
        except Reject as reject:
            if job is not None and delivered and not job.billed:
                # the backend failed after its first words (an upstream's error event, its timeout, a dropped
                # connection): an upstream bills what it streamed, so the device's quota and the bill's source
                # (the access log) count it, as they count a stream the caller cut; and the device is told the bill
                reject.status = with_metadata(reject.status, self._charge_cut_stream(job, delivered, "backend_failed"))
            self._abort(context, reject, job)
        except GeneratorExit:
            # the caller went away mid-stream (gRPC closes this generator at its yield): what it was sent
            # counts against its token quota and is logged, or cancelling after each answer would bypass both
            if job is not None and not job.billed:
                self._charge_cut_stream(job, delivered, "cancelled_by_caller")
            raise

    def _charge_cut_stream(self, job: _Job, delivered: int, finish: str) -> dict[str, str]:
        """Charge and log a stream that ended before its result: the ``delivered`` tokens and the prompt, estimated,
        once a backend had it (else streams cut after one token prefilled any prompt for free)."""
        prompt = estimated_tokens("".join(m["content"] for m in job.request.messages)) if job.started_s else 0
        return self._bill_cut_call(job, finish, prompt, delivered, estimated=True)

    def ListModels(
        self, request: bridge_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> bridge_pb2.ListModelsResponse:
        try:
            self._authenticate(context)
        except Reject as reject:
            self._abort(context, reject)
        limits = self.settings.limits
        default = self.settings.default_model
        return bridge_pb2.ListModelsResponse(
            models=[
                bridge_pb2.ModelInfo(
                    alias=alias,
                    backend=backend.kind,
                    model=backend.model,
                    context_length=backend.context_length,
                    # no more than the model's window holds either (0: a window the bridge does not know)
                    max_new_tokens_limit=min(
                        limits.max_new_tokens,
                        self.settings.models[alias].max_new_tokens or limits.max_new_tokens,
                        backend.context_length or limits.max_new_tokens,
                    ),
                    usd_per_million_input_tokens=self.settings.models[alias].usd_per_million_input_tokens,
                    usd_per_million_output_tokens=self.settings.models[alias].usd_per_million_output_tokens,
                    is_default=alias == default,
                    revision=getattr(backend, "revision", "") or "",
                    bundle_revision=getattr(backend, "bundle_revision", "") or "",
                )
                for alias, backend in self.backends.items()
            ]
        )


def _valid_request_id(request_id: str) -> bool:
    # any printable id, spaces included: a device's HybridRuntime forwards its users' ids
    return len(request_id) <= _MAX_REQUEST_ID and request_id.isprintable()


def _log_id(request_id: str) -> str:
    """The request id as every log line starts with it: as is when plain, else JSON-quoted.

    The access log is the bill's source; an id with spaces written raw could add fields to it (`x device=other
    cost_usd=99`). Quoted, it stays one value, and json.dumps escapes its quotes and control characters.
    """
    return request_id if is_plain_request_id(request_id) else json.dumps(request_id)


def _with_hint(messages: list[dict[str, str]], escalation: Escalation) -> list[dict[str, str]]:
    """Show the device's draft to the larger model as a system note, after any system prompt."""
    confidence = (
        f" (its estimated probability of being correct: {escalation.p_correct:.2f})"
        if escalation.p_correct is not None
        else ""
    )
    why = f" It was escalated because: {escalation.reason}." if escalation.reason else ""
    note = {
        "role": "system",
        "content": f"A smaller on-device model drafted an answer{confidence}.{why} Draft:\n{escalation.draft_answer}\n"
        "Answer the user yourself; keep what is right in the draft and fix what is wrong.",
    }
    at = 1 if messages and messages[0]["role"] == "system" else 0
    return [*messages[:at], note, *messages[at:]]
