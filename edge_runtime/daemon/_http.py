"""The OpenAI-compatible HTTP API (a Starlette app; uvicorn serves it).

``POST /v1/chat/completions`` (JSON, or SSE with ``stream: true``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` (503 while loading, draining or failed),
``GET /metrics`` (Prometheus text).

The runtime is blocking, so each completion runs in a worker thread of the
service's executor. A stream is bridged from that thread to the event loop
chunk by chunk (``call_soon_threadsafe`` into an asyncio queue), so text goes
out as soon as the runtime releases it. While a completion runs, a watcher
waits for the client's ``http.disconnect`` and cancels the job: the engine
stops at its next token, and nothing is escalated for a client that left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .._heap import release_free_heap
from ..engine.types import short_repr
from ..errors import EdgeRuntimeError
from ..hybrid import MODEL_ALIASES, HybridChunk, HybridResult
from ._errors import ApiError, api_error
from ._openai import (
    chunk_object,
    completion_object,
    final_chunk_objects,
    logprob_entry,
    models_object,
    parse_chat_request,
)
from ._request import ChatRequest, HeldEntries, new_request_id, valid_request_id
from ._service import ChatService, ClientGone, Job

__all__ = ["create_app"]

log = logging.getLogger("edge_runtime.daemon")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# how long a request body may take to arrive (1 MB at 100 kB/s is 10 s)
BODY_TIMEOUT_S = 30.0
# bodies larger than this are parsed and tokenized in a worker thread (64 kB take ~25 ms on the loop)
OFF_LOOP_BYTES = 65_536

_END = object()  # the worker thread finished (its future holds the result or the error)


class _AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may echo a client's lone surrogate, which has no
    UTF-8 encoding (Starlette's own rendering then fails with a plain-text 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _error_response(err: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = err.all_headers()
    if request_id is not None:  # as on an answer: the client can quote it, and the log line carries it
        headers["x-request-id"] = request_id
    return _AsciiJSONResponse(err.body(), status_code=err.status, headers=headers)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _abandon(opening: asyncio.Future[tuple[ChatRequest, Job]]) -> None:
    """End a job whose request went away while it was being opened (its slot and queue place come back)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    _req, job = opening.result()
    job.cancel("shutdown")
    try:
        for _chunk in job.iterate():  # cancelled: raises at once, and releases what the job holds
            pass
    except Exception:
        pass


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as err:  # not UTF-8, not JSON, or an integer past Python's 4,300-digit limit
        raise _BodyError(ApiError(400, f"the request body is not valid JSON: {err}", "invalid_request_error",
                                  None, "invalid_json")) from None
    except RecursionError:
        raise _BodyError(ApiError(400, "the request body is nested too deeply", "invalid_request_error",
                                  None, "invalid_json")) from None


async def _watch_disconnect(receive: Receive, job: Job) -> None:
    """Cancel ``job`` when the client goes away (the request body has been read: the next message is a disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel("client_gone")
            return


class ChatCompletions:
    """``POST /v1/chat/completions`` as a plain ASGI app: it needs ``receive`` for the whole request's life."""

    def __init__(self, service: ChatService) -> None:
        self.service = service
        # one thread for large bodies: each thread that allocates gets its own glibc arena (up to 64 MB
        # kept), and a few large requests at a time gain nothing from running side by side on 2 cores
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-runtime-parse")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await self._serve(scope, receive, send) > OFF_LOOP_BYTES:
            # a large body, its JSON and its prompt's encoding are freed by now: glibc kept those pages for the
            # daemon's life (a 900 kB prompt refused as too long: +300 MB that stayed), so they are given back
            with contextlib.suppress(RuntimeError):  # the executor is shut down: the daemon is stopping
                self._parser.submit(release_free_heap)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one request; return the size of its body (0 when it was not read whole)."""
        request = Request(scope, receive)
        # a caller's X-Request-ID is kept for tracing when it is a sane token, else replaced
        header = request.headers.get("x-request-id")
        request_id = header if valid_request_id(header) else new_request_id()
        raw = b""
        try:
            raw = await self._read_body(request)
            if len(raw) <= OFF_LOOP_BYTES:
                req, job = self._open(raw, request_id)  # a few ms at most: a thread hop would cost more
            else:
                # decoding, validating and tokenizing a large prompt takes a while (0.4 s for 1 MB): not on the
                # loop, which must go on serving every other connection meanwhile
                opening = asyncio.get_running_loop().run_in_executor(self._parser, self._open, raw, request_id)
                try:
                    req, job = await asyncio.shield(opening)
                except asyncio.CancelledError:  # going down: a job opened meanwhile must not keep its slot
                    opening.add_done_callback(_abandon)
                    raise
        except _BodyError as err:
            self.service.refused("http", err, request_id, outcome="timeout" if err.error.status == 408 else "invalid")
            response = _error_response(err.error, request_id)
            if err.error.status in (408, 413):  # the rest of the body is unread: the connection cannot go on
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return 0
        except ClientDisconnect as err:  # gone while sending the body: nobody to answer
            self.service.refused("http", err, request_id, outcome="cancelled")
            return 0
        except EdgeRuntimeError as err:
            self.service.refused("http", err, request_id)
            await _error_response(api_error(err), request_id)(scope, receive, send)
            return len(raw)
        except Exception as err:  # our bug: still an OpenAI-shaped 500, counted, and the daemon goes on
            log.exception("request %s failed before it started", request_id)
            self.service.refused("http", err, request_id)
            await _error_response(api_error(err), request_id)(scope, receive, send)
            return len(raw)
        headers = {"x-request-id": req.request_id}
        if req.stream:
            await self._stream(job, req, scope, receive, send, headers)
        else:
            await self._complete(job, req, scope, receive, send, headers)
        return len(raw)

    def _open(self, raw: bytes, request_id: str) -> tuple[ChatRequest, Job]:
        req = parse_chat_request(_decode_json(raw), request_id=request_id)
        return req, self.service.open(req, "http")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.service.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _BodyError(ApiError(413, f"the request body is over {limit} bytes (server.max_body_bytes)",
                                      "invalid_request_error", None, "request_too_large"))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):  # a client that sends its body forever holds a connection
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise _BodyError(ApiError(413, f"the request body is over {limit} bytes (server.max_body_bytes)",
                                                  "invalid_request_error", None, "request_too_large"))
                    chunks.append(chunk)
        except TimeoutError:
            raise _BodyError(ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                                      "invalid_request_error", None, "request_timeout")) from None
        return b"".join(chunks)

    async def _submit(self, job: Job, req: ChatRequest, scope: Scope, receive: Receive, send: Send,
                      *args: Any) -> asyncio.Future[HybridResult] | None:
        """``job.run(*args)`` in a worker thread; None, the client answered, when no worker could be started."""
        assert self.service.executor is not None
        try:
            return asyncio.get_running_loop().run_in_executor(self.service.executor, job.run, *args)
        except RuntimeError:  # "can't start new thread": memory or a tasks limit
            log.exception("request %s: no worker thread could be started", req.request_id)
            # the executor queued the job before it tried to start the thread: the next worker that runs finds it
            # cancelled and gives its slot back at once
            job.cancel("shutdown")
            await _error_response(api_error(RuntimeError()), req.request_id)(scope, receive, send)
            return None

    async def _complete(self, job: Job, req: ChatRequest, scope: Scope, receive: Receive, send: Send,
                        headers: dict[str, str]) -> None:
        future = await self._submit(job, req, scope, receive, send)
        if future is None:
            return
        watcher = asyncio.create_task(_watch_disconnect(receive, job))
        try:
            # shielded: if this task is cancelled the job still runs (and ends at once), releasing its slot
            result = await asyncio.shield(future)
        except ClientGone:
            return
        except EdgeRuntimeError as err:
            await _error_response(api_error(err), req.request_id)(scope, receive, send)
            return
        except asyncio.CancelledError:
            job.cancel("shutdown")
            raise
        except Exception:
            log.exception("request %s failed", req.request_id)
            await _error_response(api_error(RuntimeError()), req.request_id)(scope, receive, send)
            return
        finally:
            watcher.cancel()
        body = completion_object(result, req, created=int(time.time()), queue_ms=job.queue_ms,
                                 is_eos=self.service.is_eos, token_bytes=self.service.token_bytes)
        await JSONResponse(body, headers=headers)(scope, receive, send)

    async def _stream(self, job: Job, req: ChatRequest, scope: Scope, receive: Receive, send: Send,
                      headers: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue()

        def on_chunk(chunk: HybridChunk) -> None:  # in the worker thread
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        future = await self._submit(job, req, scope, receive, send, on_chunk)
        if future is None:
            return
        # the future's callbacks run on this loop after every chunk the thread queued before it ended
        future.add_done_callback(lambda _f: chunks.put_nowait(_END))
        watcher = asyncio.create_task(_watch_disconnect(receive, job))
        created = int(time.time())
        raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                       (b"x-accel-buffering", b"no")]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        gone = False

        async def emit(data: bytes) -> None:
            nonlocal gone
            if gone or job.reason == "client_gone":
                gone = True
                return
            try:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            except OSError:  # the connection broke under us
                gone = True
                job.cancel("client_gone")
                return
            # a held-back answer goes out in one burst: let the loop see a hang-up between chunks, or every
            # write after it makes asyncio log "socket.send() raised exception"
            await asyncio.sleep(0)

        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            # OpenAI clients read `model` off the first chunk: a `local` request names the local model from the
            # start; for `auto` (and `cloud`) the answering model is known only with the result, on the last chunk
            shown = self.service.local_model if req.model == "local" and self.service.local_model else req.model
            first = chunk_object(req, created=created, model=shown, delta={"role": "assistant", "content": ""})
            await emit(_sse(first))
            # a token whose text is held back (part of a character, or maybe of a stop string) sends its entry with
            # the text that shows it; entries still held at the end are a cut stop string's, as the answer's
            # logprobs are not
            held = HeldEntries()
            while True:
                item = await chunks.get()
                if item is _END:
                    break
                if item.kind == "withdraw":
                    held = HeldEntries()
                    continue  # OpenAI's stream has no way to take text back; HTTP never reveals drafts
                token = item.token
                if token is not None:
                    held.add(logprob_entry(token, self.service.token_bytes)
                             if req.logprobs and not self.service.is_eos(token.id) else None)
                if item.text:
                    entries = held.shown(item.tokens_shown)
                    await emit(_sse(chunk_object(req, created=created, model=shown, delta={"content": item.text},
                                                 logprobs=entries or None)))
            try:
                result: HybridResult = await asyncio.shield(future)
            except ClientGone:
                return
            except EdgeRuntimeError as err:
                await emit(_sse(api_error(err).body()))
            except Exception:
                log.exception("request %s failed", req.request_id)
                await emit(_sse(api_error(RuntimeError()).body()))
            else:
                for obj in final_chunk_objects(result, req, created=created, queue_ms=job.queue_ms):
                    await emit(_sse(obj))
            await emit(b"data: [DONE]\n\n")
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            job.cancel("shutdown")
            raise
        finally:
            watcher.cancel()


class _BodyError(Exception):
    """Control flow: the body is not JSON or too large (HTTP-only problems, answered before parsing)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def create_app(service: ChatService) -> Starlette:
    """The daemon's HTTP app over ``service``."""

    async def models(_request: Request) -> Response:
        return JSONResponse(models_object(created=service.started_at, local_model=service.local_model,
                                          cloud_model=service.cloud_model))

    async def model(request: Request) -> Response:
        alias = request.path_params["model"]
        for entry in models_object(created=service.started_at, local_model=service.local_model,
                                   cloud_model=service.cloud_model)["data"]:
            if entry["id"] == alias:
                return JSONResponse(entry)
        return _error_response(ApiError(404, f"the model {short_repr(alias)} does not exist; this daemon serves "
                                        f"{', '.join(MODEL_ALIASES)}", "invalid_request_error", "model",
                                        "model_not_found"))

    async def health(_request: Request) -> Response:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def metrics(_request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error", None, kind,
                                        headers=dict(exc.headers or {})))

    routes = [
        Route("/v1/chat/completions", ChatCompletions(service), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    async def internal_error(_request: Request, exc: Exception) -> Response:
        # what escaped every handler above: OpenAI's shape, not Starlette's plain-text 500 (it logs the traceback)
        return _error_response(api_error(exc))

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error})
