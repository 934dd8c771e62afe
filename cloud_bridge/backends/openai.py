"""The ``openai`` backend: any OpenAI-compatible ``/chat/completions`` endpoint.

That is how the bridge reaches vLLM, llama.cpp's server, Ollama or a hosted
API. It speaks HTTP with the standard library's ``http.client``: one blocking
connection per call, which is what lets a cancelled gRPC call stop the upstream
generation at once (shutting the socket down wakes the blocked read, and the
upstream sees its client go away). No third-party HTTP stack is needed on the
bridge, and none on the device.

HTTP statuses become gRPC codes (:data:`HTTP_TO_GRPC`); a 429's Retry-After
becomes the retry delay the device is told to honour. The upstream's error text
reaches the device and the bridge's log with the API key cut out: cut out of the
whole text before it is shortened, since a cut through the key would leave a
prefix of it that no later replace could find.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import math
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from edge_runtime.engine.types import well_formed
from edge_runtime.errors import BackendError

from .._settings import OpenAIModelSettings
from ._base import BackendChunk, BackendRequest, BackendResult, CancelToken, UnusableAnswerError, estimated_tokens

log = logging.getLogger("cloud_bridge")

__all__ = ["OpenAIBackend", "HTTP_TO_GRPC", "SSEParser"]

# upstream HTTP status -> (gRPC code, ErrorInfo reason)
HTTP_TO_GRPC: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "UPSTREAM_BAD_REQUEST"),
    401: ("INTERNAL", "UPSTREAM_AUTH_FAILED"),  # the bridge's API key, not the device's token
    403: ("INTERNAL", "UPSTREAM_AUTH_FAILED"),
    404: ("NOT_FOUND", "UPSTREAM_NOT_FOUND"),
    408: ("DEADLINE_EXCEEDED", "UPSTREAM_TIMEOUT"),
    409: ("ABORTED", "UPSTREAM_CONFLICT"),
    413: ("INVALID_ARGUMENT", "UPSTREAM_TOO_LARGE"),
    422: ("INVALID_ARGUMENT", "UPSTREAM_BAD_REQUEST"),
    429: ("RESOURCE_EXHAUSTED", "UPSTREAM_RATE_LIMITED"),
    500: ("UNAVAILABLE", "UPSTREAM_ERROR"),
    501: ("UNIMPLEMENTED", "UPSTREAM_UNIMPLEMENTED"),
    502: ("UNAVAILABLE", "UPSTREAM_ERROR"),
    503: ("UNAVAILABLE", "UPSTREAM_UNAVAILABLE"),
    504: ("UNAVAILABLE", "UPSTREAM_TIMEOUT"),
}
_FINISH = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "stop",
    "function_call": "stop",
}
_MAX_ERROR_BODY = 64 * 1024
# this many characters of the API key in a row are cut out of upstream text, not only the whole key
_KEY_RUN = 8
_PARTIAL_KEY_MIN = 24  # shorter keys are cut out whole only (real API keys are 40+ characters)
# an upstream's error text passed on to the device is cut: whole, a long one overflows gRPC's 16 KiB trailers and
# the device gets a retryable RESOURCE_EXHAUSTED instead of the error
_MAX_ERROR_DETAIL = 500
# no chat answer is this large; past it the upstream misbehaves, and holding it would only grow the bridge's memory
# for a message gRPC could not send anyway (its default limit is 4 MB)
_MAX_ANSWER_BYTES = 8 << 20
_MAX_LINE = 1 << 20
_DEFAULT_RETRY_AFTER_S = 1.0
_MAX_RETRY_AFTER_S = 3600.0
_MODEL_NAME_CHARS = 200  # model names are short ("gpt-4o-mini-2024-07-18"); anything longer is not one
# more tokens than any model's context holds: such a usage figure is the upstream's mistake
_MAX_USAGE_TOKENS = 10_000_000


def _error_text(body: Any) -> str:
    """An upstream's error text from its JSON: OpenAI's ``{"error": {"message"}}``, or ``{"error": "..."}``, older
    vLLM's ``{"object": "error", "message"}``, FastAPI's ``{"detail"}`` ("" when it has none of them)."""
    if not isinstance(body, dict):
        return ""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or "")
    if error:
        return str(error)
    for key in ("message", "detail"):
        if body.get(key):
            return str(body[key])
    return ""


def _grpc_for_status(status: int) -> tuple[str, str]:
    if status in HTTP_TO_GRPC:
        return HTTP_TO_GRPC[status]
    return ("UNAVAILABLE", "UPSTREAM_ERROR") if status >= 500 else ("INTERNAL", "UPSTREAM_UNEXPECTED_STATUS")


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from LLM servers; fall back to the default
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), _MAX_RETRY_AFTER_S)


def _count(usage: Mapping[str, Any], key: str) -> int | None:
    """``usage[key]`` as a token count (None when absent); a count no call can have is an unusable response.

    It is billed and charged to the device's quota: a negative one would make calls free, an absurd one would
    lock the device out until the bridge restarts.
    """
    value = usage.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_USAGE_TOKENS:
        raise _bad_response(f"usage.{key} is {value!r}, not a token count between 0 and {_MAX_USAGE_TOKENS}")
    return value


def _content(value: Any, field: str) -> str:
    """An answer's text: a string, or OpenAI's list of content parts (their text joined). Half characters are kept:
    a stream's next delta may hold the other half (``_stream``); see ``well_formed`` for the rest."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type") in ("text", "output_text")]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise _bad_response(f"{field} is a {type(value).__name__}, not text")


def _finish(value: Any, field: str) -> str | None:
    """The upstream's finish reason as ours (None: not finished); one we do not know is a plain stop."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad_response(f"{field} is a {type(value).__name__}, not a string")
    # "cancelled" is not taken from the upstream: here it says the device cancelled, which nobody did
    return _FINISH.get(value, "stop")


class SSEParser:
    """Server-sent events, line by line: ``feed(line)`` returns the event's data once a blank line ends it."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):  # comment / keep-alive
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event:, id:, retry: carry nothing we use

    def flush(self) -> str | None:
        return self.feed("")


class _Call:
    """One HTTP exchange, torn down when the gRPC call is cancelled or the deadline passes."""

    def __init__(self, backend: OpenAIBackend, cancel: CancelToken) -> None:
        self.backend = backend
        self.cancel = cancel
        s = backend.settings
        remaining = cancel.time_remaining_s()
        budget_s = s.timeout_s if remaining is None else min(s.timeout_s, remaining)
        self.deadline_s = time.monotonic() + budget_s
        # what the timeout error names: the device's deadline when it is the shorter one
        self.budget_what = (f"{s.timeout_s:g} s (timeout_s)" if budget_s >= s.timeout_s
                            else f"the {max(budget_s, 0.0):.3g} s left before the device's deadline")
        self.conn: http.client.HTTPConnection | None = None
        self.sent = False  # whether the upstream has the request (and may bill its prompt)
        # the socket timeout bounds each read, not the whole answer: an upstream sending one byte at a time
        # would never time out, so the connection is cut when the deadline passes
        self._watchdog = threading.Timer(max(budget_s, 0.0), self._abort)
        self._watchdog.daemon = True

    def remaining_s(self) -> float:
        return self.deadline_s - time.monotonic()

    def _abort(self) -> None:
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread; close() alone does not
            except OSError:
                pass

    def _timeout_error(self) -> BackendError:
        return BackendError(
            f"upstream did not answer within {self.budget_what}",
            code="DEADLINE_EXCEEDED",
            reason="UPSTREAM_TIMEOUT",
        )

    def open(self, body: bytes) -> http.client.HTTPResponse:
        b = self.backend
        if self.remaining_s() <= 0:
            raise self._timeout_error()
        connect_timeout = min(b.settings.connect_timeout_s, self.remaining_s())
        if b.scheme == "https":
            self.conn = http.client.HTTPSConnection(b.host, b.port, timeout=connect_timeout, context=b.ssl_context)
        else:
            self.conn = http.client.HTTPConnection(b.host, b.port, timeout=connect_timeout)
        self.cancel.add_callback(self._abort)
        self._watchdog.start()
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if b.api_key:
            headers["Authorization"] = f"Bearer {b.api_key}"
        if self.cancel():  # cancelled before the connection (its abort had no socket to shut)
            raise _Cancelled()
        try:
            try:
                self.conn.connect()
            except TimeoutError as err:
                if self.remaining_s() <= 0:
                    raise
                # nothing was sent: a retry may find the upstream (it was reported as the answer's timeout_s)
                raise BackendError(f"cannot reach upstream {b.host}:{b.port}: no connection within "
                                   f"{connect_timeout:.3g} s (connect_timeout_s)", reason="UPSTREAM_UNREACHABLE") from err
            if self.cancel():  # cancelled while connecting: nothing was sent
                raise _Cancelled()
            self.set_read_timeout()
            self.sent = True  # from here the upstream may have the prompt, even if the send fails half-way
            self.conn.request("POST", b.path, body=body, headers=headers)
            response = self.conn.getresponse()
        except TimeoutError as err:
            raise self._timeout_error() from err
        except (OSError, http.client.HTTPException) as err:
            if self.cancel():
                raise _Cancelled() from err
            if self.remaining_s() <= 0:  # the watchdog cut the connection at the deadline
                raise self._timeout_error() from err
            raise BackendError(
                f"cannot reach upstream {b.host}:{b.port}: {err}", reason="UPSTREAM_UNREACHABLE"
            ) from err
        if response.status != 200:
            raise self._status_error(response)
        return response

    def set_read_timeout(self) -> None:
        if self.conn is not None and self.conn.sock is not None:
            self.conn.sock.settimeout(max(0.001, self.remaining_s()))

    def _status_error(self, response: http.client.HTTPResponse) -> BackendError:
        code, reason = _grpc_for_status(response.status)
        try:
            raw = response.read(_MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            raw = b""
        body = self.backend._redact(raw.decode("utf-8", "replace"))  # before [:200] below can cut through the key
        detail = ""
        try:
            detail = _error_text(json.loads(body))
        except ValueError:
            detail = body[:200]
        detail = _cut(str(detail))
        retry_after = _retry_after_s(response.getheader("Retry-After"))
        if response.status == 429 and retry_after is None:
            retry_after = _DEFAULT_RETRY_AFTER_S
        message = f"upstream answered HTTP {response.status}" + (f": {detail}" if detail else "")
        return BackendError(message, code=code, reason=reason, retry_after_s=retry_after)

    def read_failed(self, err: BaseException) -> BaseException:
        if self.cancel():
            return _Cancelled()
        if isinstance(err, TimeoutError) or self.remaining_s() <= 0:
            return self._timeout_error()
        return BackendError(f"upstream connection failed: {err}", reason="UPSTREAM_CONNECTION_LOST")

    def close(self) -> None:
        self._watchdog.cancel()
        if self.conn is not None:
            self.conn.close()


def _is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _estimated_tokens(what: BackendRequest | str, kind: str) -> int:
    """Tokens of a prompt or an answer the upstream sent no usage for: ~4 characters a token, rounded up.

    Counting none would make such calls free, for the device's quota and in the bill; the log says it is a guess.
    """
    text = what if isinstance(what, str) else "".join(m["content"] for m in what.messages)
    tokens = estimated_tokens(text)
    log.warning("upstream sent no usage: %s tokens estimated from characters (%d)", kind, tokens)
    return tokens


def _is_json(response: http.client.HTTPResponse) -> bool:
    """Whether ``response`` says its body is JSON (an answer or an error sent whole), not server-sent events."""
    media = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _too_large(what: str = f"upstream answer is larger than {_MAX_ANSWER_BYTES >> 20} MB") -> BackendError:
    return BackendError(what, code="INTERNAL", reason="UPSTREAM_ANSWER_TOO_LARGE")


def _cut(text: str) -> str:
    # an upstream's error text goes into the call's status, which protobuf encodes: half an emoji, which JSON escapes
    # and servers counting in UTF-16 cut, would fail the call as UNKNOWN (QA OO)
    text = well_formed(text)
    return text if len(text) <= _MAX_ERROR_DETAIL else text[:_MAX_ERROR_DETAIL] + f"... ({len(text)} characters)"


class _Cancelled(Exception):
    """Internal: the call was cancelled while the upstream was talking."""


def _bad_response(detail: str) -> BackendError:
    return BackendError(f"upstream sent an unusable response: {detail}", reason="UPSTREAM_BAD_RESPONSE")


def _unusable(request: BackendRequest, data: Any, err: Exception) -> BackendError:
    """The error for a whole answer (HTTP 200) that cannot be used, ``data`` its JSON (None: not JSON).

    The upstream billed it: when the answer says what it generated (a usable count, text), the error carries what
    to bill, as a stream failing after its first words is billed; when it says nothing (a proxy's error page, say),
    nothing is billed, as for a stream failing before its first word.
    """
    error = err if isinstance(err, BackendError) else _bad_response(f"{type(err).__name__}: {err}")
    answer = data if isinstance(data, dict) else {}
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    prompt_tokens, completion_tokens = _usable_count(usage, "prompt_tokens"), _usable_count(usage, "completion_tokens")
    text = _usable_text(answer)
    if prompt_tokens is None and completion_tokens is None and text is None:
        return error
    return UnusableAnswerError(
        str(error),
        # estimated without _estimated_tokens' warning: the access line says prompt_tokens_estimated
        prompt_tokens=prompt_tokens if prompt_tokens is not None else estimated_tokens(
            "".join(m["content"] for m in request.messages)),
        completion_tokens=completion_tokens if completion_tokens is not None else estimated_tokens(text or ""),
        prompt_estimated=prompt_tokens is None,
        reason=error.reason,
    )


def _usable_count(usage: Mapping[str, Any], key: str) -> int | None:
    """``usage[key]`` when it is a token count, else None (absent, or a count no call can have)."""
    try:
        return _count(usage, key)
    except BackendError:
        return None


def _usable_text(answer: Mapping[str, Any]) -> str | None:
    """The text of an answer's first choice (maybe ""), None when it has no such choice or its content is no text."""
    try:
        content = answer["choices"][0].get("message", {}).get("content")
        return well_formed(_content(content, "choices[0].message.content"))
    except (BackendError, LookupError, TypeError, AttributeError):
        return None


# a base_url query value this long may be a key; shorter ones (api-version=2024-10-21) are left readable
_QUERY_SECRET_MIN = 16


class OpenAIBackend:
    kind = "openai"

    def __init__(self, settings: OpenAIModelSettings, *, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.model = settings.model
        self.revision = self.bundle_revision = ""  # an upstream API names its model; dated names are its revisions
        self.context_length = 0
        url = urllib.parse.urlsplit(settings.base_url)
        self.scheme = url.scheme
        self.host = url.hostname or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        # the query stays: Azure OpenAI's deployments need ?api-version=...
        self.path = url.path.rstrip("/") + "/chat/completions" + (f"?{url.query}" if url.query else "")
        self.ssl_context = ssl.create_default_context() if url.scheme == "https" else None
        # a key some APIs take in the query (Google's ?key=...): `cloud-bridge config` hides query values, and an
        # upstream's error text echoing the URL must not show it either (short values, an api-version, are no secret)
        values = [v for _name, v in urllib.parse.parse_qsl(url.query) if len(v) >= _QUERY_SECRET_MIN]
        self._query_secrets = sorted({*values, *(urllib.parse.quote(v, safe="") for v in values)}, key=len,
                                     reverse=True)
        self.api_key = settings.api_key(environ)  # read once at start: a missing key fails `serve`, not a request
        if self.api_key and self.scheme == "http" and not _is_loopback_host(self.host):
            # allowed (a LAN server with a placeholder key is common), but never silently
            log.warning("the API key for %s goes to %s over plain http, readable by anyone on the network: use https",
                        settings.model, self.host)

    def _body(self, request: BackendRequest, *, stream: bool) -> bytes:
        p = request.params
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": request.messages,
            self.settings.max_tokens_field: p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": stream,
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.top_k:
            body["top_k"] = p.top_k  # vLLM and llama.cpp honour it; only sent when asked for
        for name in self.settings.omit_params:  # refused by this upstream's model: HTTP 400 on every call
            body.pop(name, None)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode("utf-8")

    def _redact(self, text: str) -> str:
        """``text`` with the API key cut out. Upstream text must pass here whole, before any shortening.

        So is any run of ``_KEY_RUN`` or more of the key's characters: an upstream may
        echo part of it ("Incorrect API key provided: sk-SUPERSECR***").
        """
        for secret in self._query_secrets:
            text = text.replace(secret, "***")
        key = self.api_key
        if not key:
            return text
        text = text.replace(key, "***")
        if len(key) < _PARTIAL_KEY_MIN:  # a placeholder a local server takes ("lm-studio"), not a secret's prefix
            return text
        runs = {key[i:i + _KEY_RUN] for i in range(len(key) - _KEY_RUN + 1)}
        out: list[str] = []
        start = i = 0
        while i + _KEY_RUN <= len(text):
            if text[i:i + _KEY_RUN] not in runs:
                i += 1
                continue
            end = i + _KEY_RUN
            while end < len(text) and text[i:end + 1] in key:
                end += 1
            out += [text[start:i], "***"]
            start = i = end
        return "".join(out) + text[start:]

    @contextlib.contextmanager
    def _redacting(self) -> Iterator[None]:
        """Cut the API key out of the errors raised inside: the last guard, for text not redacted where it was read.

        Their messages carry upstream text (an error body, an event, a status line) to the
        device and into the bridge's log, and an upstream may echo the request's
        ``Authorization: Bearer <key>`` header in it.
        """
        try:
            yield
        except BackendError as err:
            message = str(err)
            if self._redact(message) == message:
                raise
            redacted = (
                err.with_message(self._redact(message)) if isinstance(err, UnusableAnswerError)  # its bill kept
                else BackendError(self._redact(message), code=err.code, retry_after_s=err.retry_after_s,
                                  reason=err.reason)
            )
            raise redacted from None  # the original error, and what it came from, still hold the key
        except Exception as err:  # an unforeseen failure (http.client refusing a header, say) is logged whole
            message = f"{type(err).__name__}: {err}"
            if self._redact(message) == message:
                raise
            raise BackendError(self._redact(message), code="INTERNAL", reason="BACKEND_CRASHED") from None

    def generate(self, request: BackendRequest, cancel: CancelToken) -> BackendResult:
        with self._redacting():
            return self._generate(request, cancel)

    def stream(self, request: BackendRequest, cancel: CancelToken) -> Iterator[BackendChunk]:
        with self._redacting():
            yield from self._stream(request, cancel)

    def _generate(self, request: BackendRequest, cancel: CancelToken) -> BackendResult:
        started = time.monotonic()
        call = _Call(self, cancel)
        try:
            raw = self._read_whole(call, call.open(self._body(request, stream=False)))
        except _Cancelled:
            # once the upstream had the prompt (a hosted API bills it), the device's token quota pays it, as a cut
            # stream does; cancelled before it was sent, nothing is owed
            prompt_tokens = _estimated_tokens(request, "prompt") if call.sent else 0
            return BackendResult("", "cancelled", prompt_tokens, 0, self.model)
        finally:
            call.close()
        return self._whole_answer(request, raw, started)

    @staticmethod
    def _read_whole(call: _Call, response: http.client.HTTPResponse) -> bytes:
        """A whole (not streamed) answer's bytes, at most ``_MAX_ANSWER_BYTES``."""
        try:
            raw = response.read(_MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as err:
            raise call.read_failed(err) from err
        if call.cancel():  # the call was cancelled while the answer came: what arrived may be cut short
            raise _Cancelled()
        if call.remaining_s() <= 0:  # the watchdog cut the answer short at the deadline
            raise call._timeout_error()
        if len(raw) > _MAX_ANSWER_BYTES:
            raise _too_large()
        if response.length:
            # http.client returns a body its Content-Length says is cut short without an error: it was reported as an
            # unusable answer ("JSONDecodeError: Unterminated string"), not as the lost connection it was
            raise BackendError(f"upstream connection failed: the answer ended {response.length} bytes short of its "
                               "Content-Length", reason="UPSTREAM_CONNECTION_LOST")
        return raw

    def _whole_answer(self, request: BackendRequest, raw: bytes, started: float) -> BackendResult:
        """The result of a whole answer's JSON, or the error saying why it cannot be used (billed when it says what
        was generated)."""
        data: Any = None
        try:
            # a byte that is not UTF-8 stands as U+FFFD, as in a stream: it failed the whole answer, unbilled, and the
            # device asked again (four generations, none billed)
            data = json.loads(raw.decode("utf-8", "replace"))
            failed = _error_text(data) if isinstance(data, dict) and "choices" not in data else ""
            if failed:
                raise BackendError(f"upstream failed: {_cut(self._redact(failed))}", reason="UPSTREAM_ERROR")
            choice = data["choices"][0]
            text = well_formed(_content(choice.get("message", {}).get("content"), "choices[0].message.content"))
            usage = data.get("usage") or {}
            if not isinstance(usage, dict):
                raise _bad_response(f"usage is a {type(usage).__name__}, not an object")
            prompt_tokens, completion_tokens = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
            return BackendResult(
                text=text,
                finish_reason=_finish(choice.get("finish_reason"), "choices[0].finish_reason") or "stop",
                prompt_tokens=prompt_tokens if prompt_tokens is not None else _estimated_tokens(request, "prompt"),
                completion_tokens=completion_tokens if completion_tokens is not None
                else _estimated_tokens(text, "completion"),
                model=self._model_name(data.get("model")) or self.model,
                ttft_ms=(time.monotonic() - started) * 1000.0,
            )
        except (BackendError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as err:
            raise _unusable(request, data, err) from err

    def _stream(self, request: BackendRequest, cancel: CancelToken) -> Iterator[BackendChunk]:
        started = time.monotonic()
        call = _Call(self, cancel)
        text: list[str] = []
        deltas, finish, usage, model, ttft_ms = 0, None, None, None, None
        held, owed = "", 0  # a delta's last half character (a high surrogate) for the next one to complete; deltas owed
        size = 0  # characters of the answer so far
        done = False
        whole: bytes | None = None  # the answer, when the upstream sent it whole instead of streaming it
        try:
            try:
                response = call.open(self._body(request, stream=True))
                if _is_json(response):
                    # an upstream that does not stream (or a proxy that buffers), or a 200 holding an error: the SSE
                    # parser skipped its lines, and the call failed as a lost connection, the device asking again
                    whole = self._read_whole(call, response)
                    done = True
                parser = SSEParser()
                while not done:
                    if cancel():
                        raise _Cancelled()
                    if call.remaining_s() <= 0:
                        raise call._timeout_error()
                    call.set_read_timeout()
                    try:
                        raw = response.readline(_MAX_LINE)
                    except (OSError, http.client.HTTPException, ValueError) as err:
                        if finish is not None and not cancel():
                            # the upstream said the answer was whole (and, before it, its usage) and then broke off
                            # before [DONE]: the answer stands, as at a clean end (it was billed from guesses)
                            break
                        raise call.read_failed(err) from err
                    if len(raw.rstrip(b"\r\n")) >= _MAX_LINE:
                        # http.client returns the line cut at the limit or whole, depending on how its chunks
                        # arrived: a cut one would parse as broken JSON, so refuse the line either way
                        raise _too_large(f"an upstream event line is over {_MAX_LINE >> 20} MB")
                    data = parser.feed(raw.decode("utf-8", "replace")) if raw else parser.flush()
                    if data is not None:
                        if data.strip() == "[DONE]":
                            done = True
                            break
                        piece, event_finish, event_usage, event_model = self._event(data)
                        finish = event_finish or finish
                        usage = event_usage or usage
                        model = event_model or model
                        if piece:
                            deltas += 1
                            owed += 1
                        piece = held + piece
                        held = piece[-1:] if "\ud800" <= piece[-1:] <= "\udbff" else ""
                        piece = well_formed(piece[:len(piece) - len(held)])
                        if piece:
                            text.append(piece)
                            size += len(piece)
                            if size > _MAX_ANSWER_BYTES:
                                raise _too_large()
                            if ttft_ms is None:
                                ttft_ms = (time.monotonic() - started) * 1000.0
                            yield BackendChunk(piece, owed)
                            owed = 0
                    if not raw:
                        break
            except _Cancelled:
                finish = "cancelled"
            if not done and finish is None:
                if cancel():
                    finish = "cancelled"
                elif call.remaining_s() <= 0:  # the watchdog cut the connection at the deadline
                    raise call._timeout_error()
                else:
                    raise BackendError("upstream stream ended before it finished", reason="UPSTREAM_CONNECTION_LOST")
        finally:
            call.close()
        if whole is not None:
            result = self._whole_answer(request, whole, started)
            if result.text:
                yield BackendChunk(result.text, result.completion_tokens)
            yield BackendChunk("", 0, result)
            return
        if held and finish != "cancelled":  # a half character nothing completed
            text.append("\ufffd")
            yield BackendChunk("\ufffd", owed)
        counted = _count(usage, "prompt_tokens") if usage else None
        # estimated when the upstream had the prompt but sent no usage; nothing when it never had it
        prompt_tokens = counted if counted is not None else _estimated_tokens(request, "prompt") if call.sent else 0
        # without a usage event, one content delta is one token: what OpenAI-compatible servers send
        counted = _count(usage, "completion_tokens") if usage else None
        completion_tokens = counted if counted is not None else deltas
        yield BackendChunk(
            "",
            0,
            BackendResult(
                "".join(text),
                finish or "stop",
                prompt_tokens,
                completion_tokens,
                self._model_name(model) or self.model,  # redacted once, not for every event
                ttft_ms,
            ),
        )

    def _event(self, data: str) -> tuple[str, str | None, dict[str, Any] | None, str | None]:
        try:
            obj = json.loads(data)
        except ValueError as err:
            # redacted before [:80]: a cut through the key would leave a prefix of it
            raise _bad_response(f"an event is not JSON: {self._redact(data)[:80]!r}") from err
        if not isinstance(obj, dict):
            raise _bad_response("an event is not a JSON object")
        if obj.get("error"):  # present and null (some servers send "error": null in every chunk) is no error
            error = obj["error"]
            message = error.get("message", "") if isinstance(error, dict) else str(error)
            raise BackendError(f"upstream failed mid-stream: {_cut(self._redact(str(message)))}", reason="UPSTREAM_ERROR")
        piece, finish = "", None
        choices = obj.get("choices") or []
        if not isinstance(choices, list):
            raise _bad_response(f"an event's choices is a {type(choices).__name__}, not a list")
        if choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta") or {}
            piece = _content(delta.get("content"), "choices[0].delta.content") if isinstance(delta, dict) else ""
            finish = _finish(choices[0].get("finish_reason"), "choices[0].finish_reason")
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else None
        model = obj.get("model")
        return piece, finish, usage, model if isinstance(model, str) and model else None

    def _model_name(self, value: Any) -> str | None:
        """The upstream's name for the model that answered, fit to pass on: it reaches devices, their logs and
        their run records, so the API key is cut out of it (an upstream may echo the request's headers), and
        it is one printable line of at most ``_MODEL_NAME_CHARS`` characters."""
        if not isinstance(value, str) or not value:
            return None
        name = "".join(c if c.isprintable() else "?" for c in self._redact(value))
        return name[:_MODEL_NAME_CHARS]

    def close(self) -> None:
        pass
