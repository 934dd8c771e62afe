"""The daemon's core, shared by HTTP and gRPC: state, admission, jobs, accounting and logging.

A request becomes a :class:`Job` in :meth:`ChatService.open` — on the caller's
thread, fast: state check, validation (the runtime tokenizes the prompt and
checks the context window before any compute) and a place in the queue. The
job then runs in a worker thread (:meth:`Job.iterate` / :meth:`Job.run`): it
waits for a generation slot, drives the blocking runtime, and counts its
outcome exactly once. Cancelling a job (client gone, deadline, shutdown) is
seen by the engine at its next token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from ..engine.types import SamplingParams, log_text
from ..errors import (
    EdgeRuntimeError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from ..hybrid import HybridChunk, HybridResult
from ..policies import Budget
from ._admission import Admission, Ticket
from ._metrics import Metrics
from ._request import ChatRequest, rename_field

if TYPE_CHECKING:
    from ..settings import ServerSettings

__all__ = ["ChatService", "Job", "ClientGone", "State", "handover_permits", "outcome_of"]

log = logging.getLogger("edge_runtime.daemon")

State = Literal["loading", "ready", "draining", "failed"]
CancelReason = Literal["client_gone", "timeout", "shutdown"]


class ClientGone(Exception):
    """Control flow only: the client of a job disconnected, there is nobody to answer. Never leaves the daemon."""


def outcome_of(err: BaseException) -> str:
    """The metrics outcome of a request that ended with ``err``."""
    if isinstance(err, InvalidRequestError):
        return "invalid"
    if isinstance(err, (QueueFullError, ServiceUnavailableError)):
        return "rejected"
    if isinstance(err, RequestTimeoutError):
        return "timeout"
    if isinstance(err, ClientGone):
        return "cancelled"
    return "error"


class Job:
    """One admitted request. Iterate it (or :meth:`run` it) once, in a worker thread."""

    def __init__(self, service: ChatService, request: ChatRequest, transport: str, timeout_s: float) -> None:
        self.service = service
        self.request = request
        self.transport = transport
        self.started_s = time.monotonic()
        self.deadline_s = self.started_s + timeout_s
        self.reason: CancelReason | None = None
        self.first_text_s: float | None = None
        self.ticket: Ticket  # set by ChatService.open
        self._stream: Iterator[HybridChunk]  # the runtime's (not started) generator, set by ChatService.open
        self._event = threading.Event()
        self._done = False
        self._handed_over = False  # gave its generation slot on while waiting for the bridge
        self._queued_before_s = 0.0  # time spent waiting for a slot before the one it holds now
        self.undelivered = False  # set by a transport that could not send the answer

    # ---- cancellation (any thread) -------------------------------------------------------------

    def cancel(self, reason: CancelReason) -> None:
        if not self._done and self.reason is None:
            self.reason = reason
            self._event.set()

    def cancelled(self) -> bool:
        """The runtime's cancel callable: true once cancelled or past the deadline."""
        if not self._event.is_set() and time.monotonic() > self.deadline_s:
            self.cancel("timeout")
        return self._event.is_set()

    def mark_undelivered(self) -> None:
        """The transport gave up sending this job's messages (a gRPC client that stopped reading)."""
        self.undelivered = True
        self.cancel("timeout")

    def _unanswered_outcome(self) -> str:
        return {"timeout": "timeout", "shutdown": "rejected"}.get(self.reason or "", "cancelled")

    def _cancel_error(self) -> BaseException:
        if self.reason == "timeout":
            return RequestTimeoutError(
                f"no answer within {self.deadline_s - self.started_s:.1f} s (server.request_timeout_s or the caller's "
                "deadline); the generation was stopped"
            )
        if self.reason == "shutdown":
            return ServiceUnavailableError("the daemon shut down before the answer was complete",
                                           reason="shutting_down")
        return ClientGone()

    # ---- running (a worker thread) ------------------------------------------------------------

    def iterate(self) -> Iterator[HybridChunk]:
        """Wait for a slot, then yield the runtime's chunks; the last is ``done`` with the result.

        Raises RequestTimeoutError, ServiceUnavailableError (shutdown) or ClientGone when cancelled.
        """
        outcome, result = "error", None
        try:
            # a granted ticket returns at once without looking at cancelled(): check it too, or a job
            # cancelled before it started would still start the runtime
            if not self.ticket.wait(self.cancelled) or self.cancelled():
                raise self._cancel_error()
            for chunk in self._stream:
                if chunk.kind == "done":
                    result = chunk.result
                    break
                if chunk.text and self.first_text_s is None:
                    self.first_text_s = time.monotonic()
                yield chunk
            if result is not None and self.reason == "shutdown" and result.reason == "cancelled" \
                    and result.route != "cloud" and result.finish_reason != "cancelled":
                # a drain stopped the escalation, but the local answer is whole: it is the fallback, not lost
                result = _shutdown_fallback(result)
            # a complete answer is delivered even if the deadline passed at its last token; a cut-short one is not
            if result is None or self.reason == "client_gone" or (
                    self.reason is not None and (result.finish_reason == "cancelled" or result.reason == "cancelled")):
                raise self._cancel_error()
            outcome = "answered"
            yield HybridChunk("done", result=result)
            if self.undelivered:  # grpc may resume the stream after a stalled send was ended: not delivered
                outcome = self._unanswered_outcome()
        except GeneratorExit:
            # closed early (the client left, a deadline or a shutdown), or after an answer the transport could not
            # deliver; a caller that stops reading at the "done" chunk (Job.run) closes it too, answered
            if outcome != "answered" or self.undelivered:
                outcome = self._unanswered_outcome()
            raise
        except BaseException as err:
            outcome = outcome_of(err)
            if outcome == "error" and isinstance(err, EdgeRuntimeError):
                # the client is told only "see its log" (the transports log tracebacks of anything else)
                log.error("request %s failed: %s: %s", self.request.request_id, type(err).__name__, log_text(str(err)))
            raise
        finally:
            self._done = True
            self._stream.close()  # stops the engine at once if we leave early
            self.ticket.release()
            if self._handed_over:
                self.service._handover_permits.release()
            self.service._finished(self, outcome, result)

    def run(self, on_chunk: Callable[[HybridChunk], None] | None = None) -> HybridResult:
        """The whole answer; ``on_chunk`` sees every text/withdraw chunk as it comes (streaming)."""
        for chunk in self.iterate():
            if chunk.result is not None:
                return chunk.result
            if on_chunk is not None:
                on_chunk(chunk)
        raise AssertionError("Job.iterate ended without a result")  # iterate raises instead

    def release_slot(self) -> None:
        """The engine's part is over for now (the bridge is being asked): the next request may generate.

        Only while a permit is free: a handed-over request still has its worker thread, and
        the pool has room for ``server.queue_size`` of them besides the slots and the queue.
        """
        if not self._handed_over and self.service._handover_permits.acquire(blocking=False):
            self._handed_over = True
            self.ticket.release()

    def resume_slot(self) -> bool:
        """The escalation failed before a local answer existed: wait for a slot again, first in line, to make the
        fallback. False when the request was cancelled (or ran out of time) first."""
        if not self._handed_over:
            return True  # the slot was never given on
        assert self.service.admission is not None
        self._queued_before_s += self.ticket.queue_s
        self.ticket = self.service.admission.reenter()  # released in iterate()'s finally, as the first one
        self._handed_over = False
        self.service._handover_permits.release()
        return self.ticket.wait(self.cancelled) and not self.cancelled()

    @property
    def queue_ms(self) -> float:
        return (self._queued_before_s + self.ticket.queue_s) * 1000.0


def _shutdown_fallback(result: HybridResult) -> HybridResult:
    """``result`` (its escalation cut by the daemon's drain) as the fallback it is for the client."""
    error = "ServiceUnavailableError: the daemon shut down while the bridge was answering"
    return dataclasses.replace(result, route="fallback", reason="cloud_error", cloud_error=error,
                               cloud_error_type="ServiceUnavailableError",
                               detail=f"escalation failed ({error}); local answer returned")


def handover_permits(settings: ServerSettings) -> int:
    """How many escalating requests may give their generation slot on at once (each keeps its thread)."""
    return max(1, settings.queue_size)


class ChatService:
    """Everything the transports share. ``attach(runtime)`` makes it ready; until then requests get 503."""

    def __init__(self, settings: ServerSettings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(gauges=self.gauges)
        self.state: State = "loading"
        self.error: str | None = None
        self.runtime: Any = None
        self.admission: Admission | None = None
        self._handover_permits = threading.BoundedSemaphore(1)  # sized in attach()
        self.executor: ThreadPoolExecutor | None = None
        self.started_at = int(time.time())
        self._jobs: set[Job] = set()
        self._opening = 0  # requests past the state check and not yet jobs (being tokenized, say)
        self._lock = threading.Lock()
        self._eos: frozenset[int] = frozenset()
        self._token_bytes: Callable[[int], list[int] | None] = lambda _id: None
        self.local_model = ""
        self.cloud_model = ""

    # ---- lifecycle ------------------------------------------------------------------------------

    def attach(self, runtime: Any) -> None:
        """Serve ``runtime`` (a HybridRuntime, or anything with its ``stream`` and ``engine``)."""
        slots = int(getattr(runtime.engine, "max_sessions", 1))
        self.admission = Admission(slots, self.settings.queue_size)
        handovers = handover_permits(self.settings)
        self._handover_permits = threading.BoundedSemaphore(handovers)
        # queued requests wait in a thread too: one thread per admitted or handed-over request, never more
        self.executor = ThreadPoolExecutor(max_workers=slots + self.settings.queue_size + handovers,
                                           thread_name_prefix="edge-runtime-job")
        self._eos = frozenset(getattr(runtime.engine, "eos_token_ids", ()))
        self._token_bytes = getattr(runtime.engine, "token_bytes", self._token_bytes)
        self.local_model = str(getattr(runtime.engine, "model_name", ""))
        if getattr(runtime, "cloud", None) is None:
            self.cloud_model = "no cloud bridge configured: answered locally (route local_forced)"
            policy = getattr(runtime, "policy", None)
            # gates only ever keep a request local; any other part may want the cloud
            if policy is not None and any(p.type_name not in ("never", "privacy", "budget", "chain") for p in policy.parts()):
                log.warning("the policy %s may escalate, but no [cloud] bridge is configured: such requests are answered "
                            "locally (route local_forced, reason cloud_not_configured)", policy.describe())
        else:
            hint = str(getattr(runtime, "cloud_model_hint", "") or "")
            self.cloud_model = "" if hint == "*" else hint
            if not getattr(runtime.cloud, "has_token", True):
                from ..cloud._settings import no_token_warning

                log.warning("%s", no_token_warning(getattr(runtime.cloud, "settings", None)))
        self.runtime = runtime
        if self.state == "loading":
            self.state = "ready"

    def fail(self, err: BaseException) -> None:
        self.state = "failed"
        self.error = f"{type(err).__name__}: {err}"

    def begin_drain(self) -> None:
        with self._lock:  # ordered with open()'s state check
            if self.state in ("loading", "ready"):
                self.state = "draining"

    def cancel_all(self, reason: CancelReason) -> int:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel(reason)
        return len(jobs)

    @property
    def active_jobs(self) -> int:
        """Jobs, and requests being opened: a drain waits for both."""
        with self._lock:
            return len(self._jobs) + self._opening

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- requests -------------------------------------------------------------------------------

    def _check_state(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise ServiceUnavailableError("the model is still loading", reason="model_loading", retry_after_s=2.0)
        if self.state == "draining":
            raise ServiceUnavailableError("the daemon is shutting down", reason="shutting_down")
        raise ServiceUnavailableError(f"the model failed to load: {self.error}", reason="model_failed")

    def open(self, request: ChatRequest, transport: str, *, timeout_s: float | None = None) -> Job:
        """Validate and admit ``request``; raise (our errors) if it cannot be taken. No generation yet.

        Called from worker threads (tokenizing a long prompt takes a while): under the lock, a request
        either passes the state check and counts in ``active_jobs`` at once, or sees a drain and is refused.
        """
        with self._lock:
            self._check_state()
            self._opening += 1
        try:
            return self._open(request, transport, timeout_s)
        finally:
            with self._lock:
                self._opening -= 1

    def _open(self, request: ChatRequest, transport: str, timeout_s: float | None) -> Job:
        runtime = self.runtime
        sampling = dict(request.sampling)
        sampling.setdefault("max_new_tokens", runtime.default_max_new_tokens)
        try:
            params = SamplingParams(**sampling)
        except InvalidRequestError as err:
            raise rename_field(err, request.field_names) from err
        limit_s = self.settings.request_timeout_s
        if timeout_s is not None:  # the caller's own deadline (gRPC)
            limit_s = min(limit_s, timeout_s)
        job = Job(self, request, transport, limit_s)
        try:
            # validates messages, the model alias and the context window now; generates on first next()
            # an escalation gets what is left of the deadline (a slow bridge ends as a fallback with the local
            # answer), and gives its generation slot to the next request while it waits for the network; one with no
            # local answer yet (sent to the cloud first) takes a slot again, first in line, if it needs a fallback
            job._stream = runtime.stream(request.messages, model=request.model, params=params, cancel=job.cancelled,
                                         request_id=request.request_id, reveal_draft=request.reveal_draft,
                                         deadline_s=job.deadline_s, on_escalate=job.release_slot,
                                         on_resume=job.resume_slot,
                                         # an unset max_tokens means "what fits", as in OpenAI's API
                                         fit_max_new_tokens="max_new_tokens" not in request.sampling)
        except InvalidRequestError as err:
            raise rename_field(err, request.field_names) from err
        assert self.admission is not None
        try:
            job.ticket = self.admission.enter()
        except QueueFullError:
            job._stream.close()
            raise
        with self._lock:
            self._jobs.add(job)
        return job

    def refused(self, transport: str, err: BaseException, request_id: str | None = None, *,
                outcome: str | None = None) -> None:
        """Count and log a request that never became a job (bad, refused, or the daemon not ready)."""
        outcome = outcome or outcome_of(err)
        self.metrics.count_request(transport, outcome)
        # key=value as the answer lines, the message JSON-quoted: it may echo a client's value, and a newline or an
        # "=" in it would forge or break log lines (logfmt readers dropped the queue-full ones)
        log.info("%s %s request refused: outcome=%s error=%s message=%s", transport, log_text(request_id or "-", 128),
                 outcome, type(err).__name__.lstrip("_"), json.dumps(str(err)[:300]))

    def refused_at_the_door(self, path: str, code: str, message: str) -> None:
        """A request the HTTP guard refused before any route saw it (a web page's Origin, a foreign Host)."""
        if path == "/v1/chat/completions":  # every chat request is counted once
            self.metrics.count_request("http", "invalid")
        log.info("http - request refused: outcome=invalid error=%s path=%s message=%s", code, json.dumps(path[:100]),
                 json.dumps(message[:300]))

    def _finished(self, job: Job, outcome: str, result: HybridResult | None) -> None:
        """Count and log a job; ``result``: the runtime's, also of a job whose answer was not delivered."""
        with self._lock:
            self._jobs.discard(job)
        now = time.monotonic()
        self.metrics.count_request(job.transport, outcome)
        if outcome != "answered":
            # no answer, but the bridge may have billed the escalation (a client pressing Stop in a chat app while
            # the cloud answers, an answer the transport could not deliver): counted where spend alerts look
            if result is not None:
                self.metrics.count_cloud_cost(result)
            result = None
        if result is not None:
            ttft = (job.first_text_s - job.started_s) if (job.request.stream and job.first_text_s) else None
            self.metrics.observe_answer(result, queue_s=job.queue_ms / 1000.0, total_s=now - job.started_s, ttft_s=ttft)
        req = job.request
        prompt_chars = sum(len(m["content"]) for m in req.messages)
        if result is not None:
            log.info("%s %s model=%s route=%s reason=%s answered_by=%s prompt_chars=%d answer_chars=%d tokens=%d+%d "
                     "queue_ms=%.1f total_ms=%.1f", job.transport, req.request_id, log_text(req.model, 200), result.route,
                     result.reason, log_text(result.model, 200), prompt_chars, len(result.text),
                     result.usage["local"]["completion_tokens"], result.usage["cloud"]["completion_tokens"],
                     job.queue_ms, (now - job.started_s) * 1000.0)
        else:
            log.info("%s %s model=%s outcome=%s reason=%s prompt_chars=%d total_ms=%.1f", job.transport, req.request_id,
                     log_text(req.model, 200), outcome, job.reason, prompt_chars, (now - job.started_s) * 1000.0)
        if self.settings.log_content:
            log.info("%s %s messages=%r answer=%r", job.transport, req.request_id, req.messages,
                     result.text if result is not None else None)

    # ---- views ----------------------------------------------------------------------------------

    def is_eos(self, token_id: int) -> bool:
        return token_id in self._eos

    def token_bytes(self, token_id: int) -> list[int] | None:
        return self._token_bytes(token_id)

    def retry_after_s(self) -> float:
        return self.admission.retry_after_s() if self.admission is not None else 2.0

    def _in_progress(self) -> int:
        """Admitted requests past the queue: generating, or waiting for the bridge."""
        waiting = self.admission.waiting if self.admission is not None else 0
        return max(0, self.active_jobs - waiting)

    def gauges(self) -> dict[str, Any]:
        a = self.admission
        policy = getattr(self.runtime, "policy", None)
        budgets = [p for p in (policy.parts() if policy is not None else ()) if isinstance(p, Budget)]
        # labelled without the cap (a new cap must not start a new series): "budget", or "budget[i]" among several
        labels = [(("budget", "budget" if len(budgets) == 1 else f"budget[{i}]"),) for i in range(len(budgets))]
        return {
            "edge_runtime_budget_usd": {lab: b.usd for lab, b in zip(labels, budgets)},
            "edge_runtime_budget_spent_usd": {lab: b.spent_usd() for lab, b in zip(labels, budgets)},
            "edge_runtime_queue_depth": a.waiting if a else 0,
            "edge_runtime_requests_in_progress": self._in_progress(),
            # an escalating request is in progress but has handed its slot on
            "edge_runtime_generation_slots_busy": a.running if a else 0,
            "edge_runtime_queue_capacity": self.settings.queue_size,
            "edge_runtime_generation_slots": a.slots if a else 0,
            "edge_runtime_ready": 1.0 if self.state == "ready" else 0.0,
        }

    def health(self) -> dict[str, Any]:
        a = self.admission
        out: dict[str, Any] = {"status": "ok" if self.state == "ready" else self.state,
                               "model": self.local_model or None,
                               "queue_depth": a.waiting if a else 0, "in_progress": self._in_progress()}
        if self.error:
            out["error"] = self.error
        return out
