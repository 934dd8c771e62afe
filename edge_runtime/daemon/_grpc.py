"""The daemon's gRPC service (``edgecloud.v1.EdgeRuntime``) on a Unix socket, beside the standard health service.

Same core as the HTTP API (:class:`ChatService`): the same validation, queue,
cancellation and accounting. A call's deadline bounds its job; a cancelled
call (client gone) cancels the generation. Errors are status codes with
google.rpc details, as in ``proto/edgecloud/v1/daemon.proto``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from .._grpc_decode import Undecodable, UndecodableRequests, undecodable_message
from .._proto.edgecloud.v1 import bridge_pb2, daemon_pb2, daemon_pb2_grpc
from .._unix_socket import prepare_socket_path, socket_mode
from ..engine.types import TokenInfo
from ..errors import (
    ConfigError,
    ContextLengthError,
    EdgeRuntimeError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from ..hybrid import HybridResult
from ._request import ChatRequest, HeldEntries, build_chat_request, new_request_id, valid_request_id
from ._service import CancelReason, ChatService, ClientGone, Job

__all__ = ["SERVICE_NAME", "EdgeRuntimeServicer", "create_grpc_server", "status_for", "request_from_proto"]

log = logging.getLogger("edge_runtime.daemon")

SERVICE_NAME = daemon_pb2.DESCRIPTOR.services_by_name["EdgeRuntime"].full_name
DOMAIN = "edgecloud.v1"
# a call whose deadline is this close (s) when it ends ended by the deadline
_DEADLINE_SLACK_S = 0.05
_STALLED_SEND_GRACE_S = 1.0  # after the deadline, for a stream whose client stopped reading

_FINISH = {
    "stop": bridge_pb2.FINISH_REASON_STOP,
    "eos": bridge_pb2.FINISH_REASON_EOS,
    "length": bridge_pb2.FINISH_REASON_LENGTH,
    "cancelled": bridge_pb2.FINISH_REASON_CANCELLED,
    "content_filter": bridge_pb2.FINISH_REASON_CONTENT_FILTER,
}


# ---- errors -----------------------------------------------------------------------------------------


def _status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


# ChatRequest carries these inside its `sampling` message: a field violation names them by their path there
_SAMPLING_FIELDS = frozenset({"temperature", "top_p", "top_k", "seed", "stop"})


def _proto_field(field: str | None) -> str | None:
    if field and field.split("[", 1)[0].split(".", 1)[0] in _SAMPLING_FIELDS:
        return f"sampling.{field}"
    return field


def _bad_request(field: str | None, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field or "", description=description)]
    )


def _retry_info(delay_s: float) -> error_details_pb2.RetryInfo:
    seconds = int(delay_s)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((delay_s - seconds) * 1e9)))


def _error_info(reason: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)


def status_for(err: BaseException) -> grpc.Status:
    """The gRPC status (with google.rpc details) for one of our errors."""
    if isinstance(err, ModelNotFoundError):
        return _status(grpc.StatusCode.NOT_FOUND, str(err), _bad_request("model", str(err)))
    if isinstance(err, ContextLengthError):
        return _status(grpc.StatusCode.INVALID_ARGUMENT, str(err), _bad_request(_proto_field(err.field), str(err)),
                       _error_info("CONTEXT_LENGTH_EXCEEDED"))
    if isinstance(err, InvalidRequestError):
        return _status(grpc.StatusCode.INVALID_ARGUMENT, str(err), _bad_request(_proto_field(err.field), str(err)))
    if isinstance(err, QueueFullError):
        return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), _retry_info(err.retry_after_s),
                       _error_info("QUEUE_FULL"))
    if isinstance(err, ServiceUnavailableError):
        details: list[Message] = [_error_info(err.reason.upper())]
        if err.retry_after_s is not None:
            details.append(_retry_info(err.retry_after_s))
        return _status(grpc.StatusCode.UNAVAILABLE, str(err), *details)
    if isinstance(err, RequestTimeoutError):
        return _status(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
    if isinstance(err, OutOfMemoryError):
        return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), _error_info("OUT_OF_MEMORY"))
    return _status(grpc.StatusCode.INTERNAL, "the daemon failed to answer this request (see its log)")


# ---- messages ---------------------------------------------------------------------------------------


def request_from_proto(msg: daemon_pb2.ChatRequest, *, stream: bool = False, request_id: str | None = None) -> ChatRequest:
    sampling: dict[str, Any] = {}
    s = msg.sampling
    for name in ("temperature", "top_p", "top_k", "seed"):
        if s.HasField(name):
            sampling[name] = getattr(s, name)
    if s.stop:
        sampling["stop"] = tuple(s.stop)
    if msg.HasField("max_new_tokens"):
        sampling["max_new_tokens"] = msg.max_new_tokens
    return build_chat_request(
        messages=[{"role": m.role, "content": m.content} for m in msg.messages],
        model=msg.model or None,
        sampling=sampling,
        stream=stream,  # ChatStream: its time to first text is measured, as an HTTP stream's is
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        reveal_draft=msg.reveal_draft,
        request_id=msg.request_id or request_id,
    )


def _token(token: TokenInfo, service: ChatService) -> daemon_pb2.TokenLogprob:
    out = daemon_pb2.TokenLogprob(token=token.text, logprob=token.logprob,
                                  token_bytes=bytes(service.token_bytes(token.id) or b""))
    for t in token.top_logprobs or ():
        out.top_logprobs.add(token=t.token, logprob=t.logprob, token_bytes=bytes(t.bytes or b""))
    return out


def response_from_result(result: HybridResult, job: Job) -> daemon_pb2.ChatResponse:
    service = job.service
    routing = daemon_pb2.Routing(route=result.route, policy=result.policy, reason=result.reason, detail=result.detail,
                                 cloud_error=result.cloud_error or "")
    if result.p_correct is not None:
        routing.p_correct = result.p_correct
    if result.threshold is not None:
        routing.threshold = result.threshold
    if result.draft is not None:
        routing.draft = result.draft
    e = result.energy
    energy = daemon_pb2.Energy(joules=e["joules"], source=e["source"], estimated=e["estimated"], seconds=e["seconds"],
                               network_joules=e["network_joules"], wait_joules=e["wait_joules"],
                               estimator_joules=e["estimator_joules"])
    if e.get("process_joules") is not None:
        energy.process_joules = e["process_joules"]
    c = result.cost
    lat = result.latency_ms
    response = daemon_pb2.ChatResponse(
        request_id=result.request_id, text=result.text, finish_reason=_FINISH.get(result.finish_reason, 0),
        model=result.model, routing=routing, energy=energy,
        cost=daemon_pb2.Cost(cloud_usd=c["cloud_usd"], device_energy_usd=c["device_energy_usd"],
                             network_energy_j=c["network_energy_j"], total_usd=c["total_usd"],
                             device_energy_estimated=c["device_energy_estimated"],
                             cloud_usd_unknown=c["cloud_usd_unknown"]),
        usage=daemon_pb2.RouteUsage(local=bridge_pb2.Usage(**result.usage["local"]),
                                    cloud=bridge_pb2.Usage(**result.usage["cloud"]),
                                    accepted_prediction_tokens=result.predictions["accepted"],
                                    rejected_prediction_tokens=result.predictions["rejected"],
                                    cached_prompt_tokens=result.cached_prompt_tokens),
        latency=daemon_pb2.Latency(queue_ms=job.queue_ms, local_prefill_ms=lat["local_prefill_ms"],
                                   local_decode_ms=lat["local_decode_ms"], cloud_ms=lat["cloud_ms"],
                                   network_ms=lat["network_ms"], total_ms=lat["total_ms"]),
    )
    if job.request.logprobs and result.route != "cloud":
        response.logprobs.extend(_token(t, service) for t in result.tokens if not service.is_eos(t.id))
    return response


# ---- the service ------------------------------------------------------------------------------------


class EdgeRuntimeServicer(daemon_pb2_grpc.EdgeRuntimeServicer):
    """``max_calls``: chat calls in progress (running, queued, or still sending) beyond which a call is refused
    at once. Counted here rather than by gRPC's own ``maximum_concurrent_rpcs``, which counted health checks
    too: a daemon whose calls held every thread answered its health check with RESOURCE_EXHAUSTED."""

    def __init__(self, service: ChatService, *, max_calls: int | None = None) -> None:
        self.service = service
        self.max_calls = max_calls
        self._calls = threading.BoundedSemaphore(max_calls) if max_calls else None

    @staticmethod
    def _announce_request_id(caller_id: str, context: grpc.ServicerContext) -> str:
        """The call's request id, the caller's or made up, sent at once as ``x-request-id`` initial metadata (as
        HTTP answers its header), so that even a refused call has an id its caller can quote and the log names.
        A caller's id that cannot be one (a newline, megabytes) is replaced here, as HTTP replaces a bad header,
        and the call is then refused naming ``request_id``. Without an id in the request, a valid ``x-request-id``
        in the call's metadata is the id, as HTTP takes that header (an invalid one is replaced, as HTTP's is)."""
        if not caller_id:
            caller_id = next((value for key, value in context.invocation_metadata() or ()
                              if key == "x-request-id" and isinstance(value, str)), "")
        rid = caller_id if valid_request_id(caller_id) else new_request_id()
        context.send_initial_metadata((("x-request-id", rid),))
        return rid

    def refuse_undecodable(self, request: Undecodable, context: grpc.ServicerContext) -> NoReturn:
        """A request that is not valid protobuf: INVALID_ARGUMENT, and a chat call is counted and logged as refused."""
        err = InvalidRequestError(undecodable_message(request))
        if request.method.startswith(f"/{SERVICE_NAME}/"):  # every chat request is counted once; health checks not
            self._refuse(self._announce_request_id("", context), context, err)
        context.abort_with_status(status_for(err))
        raise AssertionError("abort_with_status returned")  # pragma: no cover - it always raises

    def _refuse(self, rid: str, context: grpc.ServicerContext, err: EdgeRuntimeError) -> None:
        self.service.refused("grpc", err, rid)
        context.abort_with_status(status_for(err))

    def _call_slot(self, rid: str, context: grpc.ServicerContext) -> contextlib.ExitStack:
        """Take one of the ``max_calls`` slots for this call; released when the returned stack closes."""
        stack = contextlib.ExitStack()
        if self._calls is not None:
            if not self._calls.acquire(blocking=False):
                self._refuse(rid, context, QueueFullError(
                    f"the daemon's gRPC socket has {self.max_calls} calls in progress, its limit"))
            stack.callback(self._calls.release)
        return stack

    def _open(self, request: daemon_pb2.ChatRequest, rid: str, context: grpc.ServicerContext, *,
              stream: bool = False) -> Job:
        try:
            req = request_from_proto(request, stream=stream, request_id=rid)
            job = self.service.open(req, "grpc", timeout_s=context.time_remaining())
        except EdgeRuntimeError as err:
            self._refuse(rid, context, err)
            raise  # abort_with_status raises; this line is for the type checker
        # runs when the call ends for any reason; a no-op for a job that already finished. False: the call ended
        # while it was being opened (a long prompt's tokenizing), and the callback will never run: the job ran to
        # its end for nobody, holding a generation slot, and a unary call was counted as answered
        if not context.add_callback(lambda: job.cancel(_end_reason(context))):
            job.cancel(_end_reason(context))
        return job

    def Chat(self, request: daemon_pb2.ChatRequest, context: grpc.ServicerContext) -> daemon_pb2.ChatResponse:
        rid = self._announce_request_id(request.request_id, context)
        with self._call_slot(rid, context):
            job = self._open(request, rid, context)
            with _aborting_on_error(job, context):
                return response_from_result(job.run(), job)
        raise AssertionError("unreachable: abort() raises")

    def ChatStream(self, request: daemon_pb2.ChatRequest,
                   context: grpc.ServicerContext) -> Iterator[daemon_pb2.ChatStreamResponse]:
        rid = self._announce_request_id(request.request_id, context)
        with self._call_slot(rid, context) as stack:
            job = self._open(request, rid, context, stream=True)
            watchdog = _StallWatchdog(job, context)
            stack.callback(watchdog.stop)
            stack.enter_context(_aborting_on_error(job, context))
            # a token whose text is held back (part of a character, or maybe of a stop string) is sent just before
            # the text that shows it; those still held at the end are a cut stop string's, as the final answer's
            # are not
            held: HeldEntries[daemon_pb2.ChatDelta] = HeldEntries()
            for chunk in job.iterate():
                if chunk.result is not None:
                    yield from watchdog.send(daemon_pb2.ChatStreamResponse(final=response_from_result(chunk.result, job)))
                elif chunk.kind == "withdraw":
                    held = HeldEntries()
                    yield from watchdog.send(daemon_pb2.ChatStreamResponse(withdraw=daemon_pb2.Withdraw()))
                else:
                    delta = daemon_pb2.ChatDelta(text=chunk.text)
                    token = chunk.token
                    if token is not None:
                        logprob = job.request.logprobs and not self.service.is_eos(token.id)
                        if logprob:
                            delta.logprob.CopyFrom(_token(token, self.service))
                        if not chunk.text:
                            held.add(delta if logprob else None)
                            continue
                        held.add(None)  # sent with its own text, below
                    if not chunk.text:
                        continue
                    for waiting in held.shown(chunk.tokens_shown):
                        yield from watchdog.send(daemon_pb2.ChatStreamResponse(delta=waiting))
                    yield from watchdog.send(daemon_pb2.ChatStreamResponse(delta=delta))


class _StallWatchdog:
    """Ends a stream whose client stopped reading, once its deadline has passed.

    The job checks its deadline between tokens, but grpc pulls the stream's generator only when it
    can send: a client that stops reading blocks the send (flow control), the engine is never
    advanced, and the job would hold its generation slot for as long as the client stalls. Past the
    deadline, a stream that has been waiting in one send for the grace period is ended from outside.
    A job that is still working (a slow step, a late cloud fallback) is left to its own deadline
    check, which ends it with its proper status.
    """

    def __init__(self, job: Job, context: grpc.ServicerContext) -> None:
        self.job, self.context = job, context
        self._sending_since: float | None = None  # when the stream handed grpc the message it is still sending
        self._timer: threading.Timer | None = None
        self._stopped = False
        self._arm(job.deadline_s - time.monotonic() + _STALLED_SEND_GRACE_S)

    def send(self, message: daemon_pb2.ChatStreamResponse) -> Iterator[daemon_pb2.ChatStreamResponse]:
        self._sending_since = time.monotonic()
        yield message  # returns when grpc has sent it and asks for the next
        self._sending_since = None

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()

    def _arm(self, delay_s: float) -> None:
        if self._stopped:
            return
        # Timer refuses waits past threading.TIMEOUT_MAX (a request_timeout_s of 1e10 is allowed)
        self._timer = threading.Timer(min(max(delay_s, 0.0), threading.TIMEOUT_MAX), self._check)
        self._timer.daemon = True
        self._timer.start()

    def _check(self) -> None:
        since = self._sending_since
        if since is not None and time.monotonic() - since >= _STALLED_SEND_GRACE_S:
            log.warning("request %s: the gRPC client stopped reading its stream; ended after the deadline",
                        self.job.request.request_id)
            self.job.mark_undelivered()
            self.context.cancel()  # ends the blocked send; the generator is closed, and the job frees its slot
            return
        # still working, or sending for less than the grace: look again
        self._arm(_STALLED_SEND_GRACE_S if since is None else since + _STALLED_SEND_GRACE_S - time.monotonic())


def _end_reason(context: grpc.ServicerContext) -> CancelReason:
    """Why a call ended before its job: the caller's deadline passed (a timeout, as over HTTP) or it left."""
    remaining = context.time_remaining()
    return "timeout" if remaining is not None and remaining <= _DEADLINE_SLACK_S else "client_gone"


@contextlib.contextmanager
def _aborting_on_error(job: Job, context: grpc.ServicerContext) -> Iterator[None]:
    """End the call with the status of what a running job raised (``abort`` raises, so nothing goes on)."""
    try:
        yield
    except ClientGone:
        context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
    except EdgeRuntimeError as err:
        context.abort_with_status(status_for(err))
    except Exception:
        log.exception("request %s failed", job.request.request_id)
        context.abort_with_status(status_for(RuntimeError()))


# ---- the server -------------------------------------------------------------------------------------


def create_grpc_server(service: ChatService, socket_path: str | os.PathLike[str], *, max_calls: int,
                       ) -> tuple[grpc.Server, health.HealthServicer, Path]:
    """A gRPC server (not started) with the daemon and health services on ``socket_path``, mode 0600."""
    path = Path(socket_path).expanduser().absolute()
    prepare_socket_path(path, field="server.grpc_socket", server="edge-runtime daemon")
    # a thread per chat call the servicer admits (``max_calls``; beyond it refuses at once), and a few more for
    # health checks and those refusals
    servicer = EdgeRuntimeServicer(service, max_calls=max_calls)
    server = grpc.server(ThreadPoolExecutor(max_workers=max_calls + 4, thread_name_prefix="edge-runtime-grpc"),
                         interceptors=[UndecodableRequests(servicer.refuse_undecodable)])
    daemon_pb2_grpc.add_EdgeRuntimeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # the socket must never exist with looser permissions, not even between bind and chmod
    try:
        with socket_mode(path, 0o600):
            bound = server.add_insecure_port(f"unix:{path}")
            if not bound:
                raise ConfigError(f"cannot listen on {path}", field="server.grpc_socket")
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {path}: {err}", field="server.grpc_socket") from err
    return server, health_servicer, path
