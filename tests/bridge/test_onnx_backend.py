"""The onnx backend: the engine adapter (against a stand-in that follows the engine's API) and, once the engine
and the ``tiny_bundle`` fixture exist, the real engine behind a real bridge."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cloud_bridge import OnnxModelSettings
from cloud_bridge.backends.onnx import OnnxBackend
from edge_runtime.engine.types import GenerationResult, SamplingParams, StreamChunk, Timings, TokenInfo, Usage
from edge_runtime.errors import CloudError, CloudTimeoutError, CloudUnavailableError, ContextLengthError

HI = [{"role": "user", "content": "hi"}]


class StandInEngine:
    """Follows the documented Engine API: one token every ``delay_s``, honours ``cancel`` like the engine does."""

    def __init__(
        self,
        bundle: Any,
        intra_op_threads: int | None = None,
        max_sessions: int = 1,
        *,
        delay_s: float = 0.0,
        fail: Exception | None = None,
    ) -> None:
        self.bundle, self.max_sessions = bundle, max_sessions
        self.model_name, self.context_length = "stand-in-0.5b", 64
        self.delay_s, self.fail = delay_s, fail
        self.finished: list[tuple[str, int]] = []
        self.closed = False

    def encode(self, prompt: str | None = None, *, messages: Any = None) -> list[int]:
        return [0] * sum(len(m["content"].split()) for m in messages)

    def stream(self, messages: Any, params: SamplingParams, cancel: Any):
        prompt = len(self.encode(messages=messages))
        if prompt + params.max_new_tokens > self.context_length:
            raise ContextLengthError("too long", field="messages")  # the engine's field whenever max_new_tokens fits
        if self.fail is not None:
            raise self.fail
        stop = cancel.is_set if isinstance(cancel, threading.Event) else cancel
        text, tokens, finish = "", [], "length"
        for i in range(params.max_new_tokens):
            if stop():
                finish = "cancelled"
                break
            time.sleep(self.delay_s)
            piece = f" t{i}"
            text += piece
            token = TokenInfo(id=i, text=piece, logprob=-0.1, entropy=0.2, margin=0.5)
            tokens.append(token)
            yield StreamChunk(piece, token)
        self.finished.append((finish, len(tokens)))
        result = GenerationResult(
            text=text,
            token_ids=[t.id for t in tokens],
            finish_reason=finish,
            tokens=tokens,
            usage=Usage(prompt_tokens=prompt, completion_tokens=len(tokens)),
            timings=Timings(load_ms=0, prefill_ms=1, decode_ms=2, ttft_ms=1.5),
            model=self.model_name,
        )
        yield StreamChunk("", None, result)

    def generate(self, messages: Any, params: SamplingParams, cancel: Any) -> GenerationResult:
        *_, last = self.stream(messages, params, cancel)
        return last.result

    def close(self) -> None:
        self.closed = True


def stand_in(**kwargs: Any):
    def factory(settings: OnnxModelSettings) -> StandInEngine:
        return StandInEngine(settings.bundle, settings.intra_op_threads, settings.workers, **kwargs)

    return factory


def test_the_adapter_maps_results_streams_and_sessions(start_bridge, make_client, tmp_path):
    backend = OnnxBackend(OnnxModelSettings(bundle=tmp_path, workers=2), engine_factory=stand_in())
    assert backend.engine.max_sessions == 2  # as many engine sessions as bridge workers
    bridge = start_bridge(backends={"coder": backend}, models={})
    client = make_client(bridge)
    result = client.generate(HI, params=SamplingParams(max_new_tokens=3))
    assert (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens) == (
        " t0 t1 t2",
        "length",
        1,
        3,
    )
    assert result.model == "stand-in-0.5b" and result.server_timings.ttft_ms == 1.5
    chunks = list(client.stream(HI, params=SamplingParams(max_new_tokens=2)))
    assert [(c.text, c.token_count) for c in chunks[:-1]] == [(" t0", 1), (" t1", 1)]
    assert client.list_models()[0].context_length == 64
    bridge.server.stop(0)
    assert backend.engine.closed


def test_a_deadline_stops_the_engine(start_bridge, make_client, tmp_path):
    backend = OnnxBackend(OnnxModelSettings(bundle=tmp_path), engine_factory=stand_in(delay_s=0.02))
    bridge = start_bridge(backends={"coder": backend}, models={})
    with pytest.raises(CloudTimeoutError):
        make_client(bridge, max_attempts=1).generate(HI, params=SamplingParams(max_new_tokens=60), timeout_s=0.2)
    deadline = time.monotonic() + 3
    while not backend.engine.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    finish, tokens = backend.engine.finished[0]
    assert finish == "cancelled" and tokens < 30


def test_engine_errors_become_statuses(start_bridge, make_client, tmp_path):
    too_long = OnnxBackend(OnnxModelSettings(bundle=tmp_path), engine_factory=stand_in())
    broken = OnnxBackend(
        OnnxModelSettings(bundle=tmp_path), engine_factory=stand_in(fail=RuntimeError("onnxruntime: bad alloc"))
    )
    bridge = start_bridge(backends={"coder": too_long, "broken": broken}, models={})
    client = make_client(bridge, max_attempts=1)
    with pytest.raises(CloudError) as info:
        client.generate(HI, model="coder", params=SamplingParams(max_new_tokens=100))
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(CloudUnavailableError) as unavailable:
        client.generate(HI, model="broken", params=SamplingParams(max_new_tokens=4))
    assert "ENGINE_FAILED" in str(unavailable.value)


@pytest.mark.parametrize(
    ("words", "max_new_tokens", "field"), [(1, 100, "max_new_tokens"), (3, 62, "max_new_tokens"), (70, 1, "messages")]
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_context_overflow_names_the_field_to_change_as_every_backend_does(
    start_bridge, make_client, tmp_path, words, max_new_tokens, field, stream
):
    backend = OnnxBackend(OnnxModelSettings(bundle=tmp_path), engine_factory=stand_in())  # a window of 64
    client = make_client(start_bridge(backends={"coder": backend}, models={}), max_attempts=1)
    messages = [{"role": "user", "content": "a " * words}]
    params = SamplingParams(max_new_tokens=max_new_tokens)
    with pytest.raises(CloudError) as info:
        list(client.stream(messages, params=params)) if stream else client.generate(messages, params=params)
    assert f"INVALID_ARGUMENT: {field}: " in str(info.value) and str(info.value).endswith("[CONTEXT_LENGTH_EXCEEDED]")


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_without_a_length_gets_what_the_window_leaves(start_bridge, make_client, tmp_path, stream):
    backend = OnnxBackend(OnnxModelSettings(bundle=tmp_path), engine_factory=stand_in())  # a window of 64
    client = make_client(start_bridge(backends={"coder": backend}, models={}), max_attempts=1)
    messages = [{"role": "user", "content": "a " * 60}]  # the bridge's default, 256 new tokens, does not fit
    result = list(client.stream(messages))[-1].result if stream else client.generate(messages)
    assert (result.completion_tokens, result.finish_reason) == (4, "length")
    assert backend.engine.finished == [("length", 4)]


@pytest.fixture
def real_bundle(request: pytest.FixtureRequest) -> Any:
    engine = pytest.importorskip("edge_runtime.engine")
    if not hasattr(engine, "Engine"):
        pytest.skip("edge_runtime.engine does not export Engine yet")
    try:
        return request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_bundle fixture in tests/conftest.py yet")


def test_the_real_engine_behind_the_bridge(real_bundle, start_bridge, make_client):
    bridge = start_bridge(models={"tiny": {"backend": "onnx", "bundle": str(real_bundle), "workers": 1}})
    client = make_client(bridge)
    result = client.generate(HI, params=SamplingParams(max_new_tokens=8))
    assert result.completion_tokens >= 1 and result.finish_reason in ("length", "eos", "stop")
    assert result.prompt_tokens > 0 and result.model
    chunks = list(client.stream(HI, params=SamplingParams(max_new_tokens=8)))
    assert "".join(c.text for c in chunks[:-1]) == chunks[-1].result.text
    assert sum(c.token_count for c in chunks[:-1]) == chunks[-1].result.completion_tokens
    # a prompt that leaves less of the window than the bridge's default: no length asked, what is left given
    engine = bridge.backend("tiny").engine
    words = next(n for n in range(1, 4 * engine.context_length)
                 if len(engine.encode(messages=[{"role": "user", "content": "a " * n}])) >= engine.context_length - 3)
    long_prompt = [{"role": "user", "content": "a " * words}]
    room = engine.context_length - len(engine.encode(messages=long_prompt))
    assert 0 < room <= 3
    for fitted in (client.generate(long_prompt), list(client.stream(long_prompt))[-1].result):
        assert 1 <= fitted.completion_tokens <= room and fitted.finish_reason in ("length", "eos")
    # the bundle's hash identifies what answers to clients that cache answers (the explorer's run cache); the files'
    # hash, as older bridges sent it, stays in `revision` for older devices
    from edge_runtime.bundle import load_manifest

    info, manifest = client.list_models()[0], load_manifest(real_bundle)
    assert (info.revision, info.bundle_revision) == (manifest.legacy_bundle_hash, manifest.bundle_hash)
