"""The official openai client against a running daemon (tiny model; a real bridge where the cloud answers)."""

from __future__ import annotations

import math
import urllib.request

import pytest

from .conftest import ASK, CLOUD_REPLY, cloud_client, runtime, stops_released_in_part

openai = pytest.importorskip("openai")


@pytest.fixture
def client():
    """``client(daemon)`` -> an openai.OpenAI aimed at the daemon (no retries); closed at teardown."""
    made = []

    def make(daemon):
        c = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed", max_retries=0, timeout=30.0)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def local_daemon(engine, start_daemon):
    return start_daemon(runtime(engine, {"type": "never"}))


def test_a_chat_completion_answered_locally_carries_routing_energy_and_cost(engine, local_daemon, client):
    c = client(local_daemon)
    done = c.chat.completions.create(model="auto", messages=ASK, max_tokens=6)
    direct = engine.generate(messages=ASK, max_new_tokens=6)
    assert done.object == "chat.completion" and done.model == engine.model_name
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == direct.text  # greedy: the same answer as the engine alone
    assert done.choices[0].finish_reason == ("length" if direct.finish_reason == "length" else "stop")
    assert done.usage.completion_tokens == 6 and done.usage.prompt_tokens == direct.usage.prompt_tokens
    extra = done.model_extra
    assert extra["routing"]["route"] == "local" and extra["routing"]["reason"] == "policy_never"
    assert 0.0 <= extra["routing"]["p_correct"] <= 1.0 and extra["routing"]["policy"]
    assert extra["energy"]["joules"] > 0 and extra["energy"]["source"] == "test:constant"
    assert extra["cost"]["cloud_usd"] == 0 and extra["cost"]["device_energy_usd"] > 0
    assert extra["latency"]["queue_ms"] >= 0 and extra["latency"]["local_decode_ms"] > 0


def test_a_streamed_completion_arrives_in_chunks_that_add_up(engine, local_daemon, client):
    c = client(local_daemon)
    chunks = list(c.chat.completions.create(model="local", messages=ASK, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    whole = c.chat.completions.create(model="local", messages=ASK, max_tokens=8)
    texts = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert len([t for t in texts if t]) >= 2  # token by token, not one blob
    assert "".join(texts) == whole.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1
    last = finals[0]
    assert last.model == engine.model_name  # the model that answered, on the last chunk
    assert {ch.model for ch in chunks} == {engine.model_name}  # and on every chunk of a `local` request
    routing = last.model_extra["routing"]
    assert routing["route"] == "local" and routing["reason"] == "requested_local"
    assert last.model_extra["energy"]["joules"] > 0
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens


def test_logprobs_and_top_logprobs_in_openai_shape(engine, local_daemon, client):
    c = client(local_daemon)
    done = c.chat.completions.create(model="local", messages=ASK, max_tokens=5, logprobs=True, top_logprobs=3)
    content = done.choices[0].logprobs.content
    direct = engine.generate(messages=ASK, max_new_tokens=5, top_logprobs=3)
    kept = [t for t in direct.tokens if t.id not in engine.eos_token_ids]
    assert [e.token for e in content] == [t.text for t in kept]
    for entry, tok in zip(content, kept, strict=True):
        assert math.isclose(entry.logprob, tok.logprob, rel_tol=1e-6) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.token in [t.token for t in entry.top_logprobs]  # greedy: the chosen token is among the best
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace")
    answer_bytes = bytes(b for e in content for b in e.bytes)
    assert answer_bytes.decode("utf-8", "replace") == done.choices[0].message.content

    streamed = list(c.chat.completions.create(model="local", messages=ASK, max_tokens=5, logprobs=True, top_logprobs=2,
                                              stream=True))
    entries = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_models_list_names_the_three_aliases(local_daemon, client):
    c = client(local_daemon)
    assert [m.id for m in c.models.list()] == ["auto", "local", "cloud"]
    assert c.models.retrieve("local").id == "local"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_escalated_answer_comes_from_the_cloud_and_says_so(engine, bridge, start_daemon, client):
    rt = runtime(engine, {"type": "threshold", "p": 0.999}, cloud=cloud_client(bridge.address))
    daemon = start_daemon(rt)
    try:
        c = client(daemon)
        done = c.chat.completions.create(model="auto", messages=ASK, max_tokens=6, logprobs=True)
        routing = done.model_extra["routing"]
        assert done.choices[0].message.content == CLOUD_REPLY and done.model == "big-cloud-model"
        assert routing["route"] == "cloud" and routing["reason"] == "p_correct_below_threshold"
        assert routing["p_correct"] < routing["threshold"] == 0.999 and routing["draft"]
        assert done.model_extra["cost"]["cloud_usd"] > 0 and done.model_extra["energy"]["network_joules"] > 0
        assert done.usage.model_extra["cloud"]["completion_tokens"] > 0
        assert done.usage.model_extra["local"]["completion_tokens"] == 6  # the draft is accounted for
        assert done.choices[0].logprobs.content is None  # the bridge sends no per-token log-probabilities

        # streamed: the held-back local draft never reaches the client, only the cloud's text
        chunks = list(c.chat.completions.create(model="auto", messages=ASK, max_tokens=6, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == CLOUD_REPLY
        assert chunks[-1].model == "big-cloud-model" and chunks[-1].model_extra["routing"]["route"] == "cloud"

        pinned = c.chat.completions.create(model="cloud", messages=ASK, max_tokens=6)
        pinned_routing = pinned.model_extra["routing"]
        assert pinned_routing["route"] == "cloud" and pinned_routing["reason"] == "requested_cloud"
        assert pinned.usage.model_extra["local"]["completion_tokens"] == 0  # nothing decoded locally
    finally:
        rt.cloud.close()


def test_logprobs_are_those_of_the_text_not_of_a_stop_string_cut_from_it(engine, local_daemon, client):
    plain = engine.generate(messages=ASK, max_new_tokens=8)
    texts = [t.text for t in plain.tokens]
    k = next(i for i in range(len(texts) - 1) if len(texts[i]) >= 2 and texts[i + 1].isprintable() and texts[i + 1])
    stop = texts[k][1:] + texts[k + 1]  # starts inside token k: k shows a character, k + 1 none
    c = client(local_daemon)
    done = c.chat.completions.create(model="local", messages=ASK, max_tokens=8, logprobs=True, stop=stop)
    assert done.choices[0].finish_reason == "stop" and done.usage.completion_tokens == k + 2
    assert [e.token for e in done.choices[0].logprobs.content] == texts[:k + 1]
    streamed = list(c.chat.completions.create(model="local", messages=ASK, max_tokens=8, logprobs=True, stop=stop,
                                              stream=True))
    entries = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in entries] == texts[:k + 1]
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == done.choices[0].message.content


def test_the_sdk_does_not_run_a_request_cut_at_its_deadline_again(engine, start_daemon):
    # the 504 had no x-should-retry header: the SDK's default two retries ran the same generation three times, each
    # burning the whole timeout, before the app saw the error
    from .conftest import SlowEngine, metric

    daemon = start_daemon(runtime(SlowEngine(engine, delay_s=0.05), {"type": "never"}), request_timeout_s=0.3)
    c = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="not-needed", timeout=30.0)  # the SDK's default retries
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            c.chat.completions.create(model="local", messages=ASK, max_tokens=200)
    finally:
        c.close()
    assert caught.value.status_code == 504 and caught.value.response.headers["x-should-retry"] == "false"
    with urllib.request.urlopen(f"{daemon.url}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert metric(text, "edge_runtime_requests_total", transport="http", outcome="timeout") == 1


def test_the_sdks_newer_fields_that_ask_for_nothing_are_accepted(local_daemon, client):
    # moderation (null) and the prompt-cache hints are parameters of the SDK's create(): they were 400 "unknown field"
    c = client(local_daemon)
    done = c.chat.completions.create(model="local", messages=ASK, max_tokens=2, moderation=None,
                                     prompt_cache_retention="24h", prompt_cache_options={"ttl": "30m"})
    assert done.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as caught:  # a moderation asked for is refused, not ignored
        c.chat.completions.create(model="local", messages=ASK, max_tokens=2, extra_body={"moderation": {"model": "x"}})
    assert caught.value.body["param"] == "moderation"


def test_streamed_logprobs_leave_out_a_held_token_whose_text_a_stop_string_then_cuts(engine, local_daemon, client):
    # the stops hold u and v, then release u alone: v's entry went out with u's text, though v's text never came
    sampling, shown = stops_released_in_part(engine, ASK)
    c = client(local_daemon)
    done = c.chat.completions.create(model="local", messages=ASK, max_tokens=40, logprobs=True, **sampling)
    assert done.choices[0].finish_reason == "stop" and done.choices[0].message.content == "".join(shown)
    assert [e.token for e in done.choices[0].logprobs.content] == shown
    streamed = list(c.chat.completions.create(model="local", messages=ASK, max_tokens=40, logprobs=True, stream=True,
                                              **sampling))
    entries = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in entries] == shown
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == "".join(shown)
