"""Prompt-lookup drafts: the index, and greedy decoding that checks drafts in multi-row steps."""

from __future__ import annotations

import threading

import pytest
from tiny_models import hf_greedy

from edge_runtime.engine import Engine, SamplingParams
from edge_runtime.engine import engine as engine_module
from edge_runtime.engine._lookup import PromptLookup
from edge_runtime.errors import InvalidRequestError

REPETITIVE = "one two three four five six " * 6


def test_a_draft_continues_the_longest_earlier_match():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 3, 4], max_draft=3)
    # the ending "7 3 4" is new; "3 4" was last followed by 7: a 2-token match drafts one token
    assert lookup.draft(5) == [7]
    lookup.extend([8])  # "4 8" is new: nothing to draft
    assert lookup.draft(5) == []
    lookup = PromptLookup([1, 2, 3, 4, 5, 6, 1, 2, 3], max_draft=3)
    assert lookup.draft(5) == [4, 5]  # a 3-token match drafts two
    lookup.extend([4])
    assert lookup.draft(5) == [5, 6, 1]  # a 4-token match three, the most max_draft allows
    assert lookup.draft(1) == [5]  # never more than asked for
    assert lookup.draft(0) == []
    # a larger max_draft looks for longer matches too: a 6-token match drafts five
    tokens = [9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6]
    assert PromptLookup(tokens, max_draft=5).draft(9) == [7, 8, 1, 2, 3]
    assert PromptLookup(tokens, max_draft=3).draft(9) == [7, 8, 1]


def test_the_index_built_token_by_token_equals_one_built_at_once():
    tokens = [5, 1, 2, 5, 1, 2, 3, 5, 1, 2, 5, 1]
    whole = PromptLookup(tokens)
    grown = PromptLookup()
    for t in tokens:
        grown.extend([t])
    assert len(grown) == len(whole) == len(tokens)
    # the ending "1 2 5 1" occurred at positions 1-4, followed by "2 3 5"
    assert grown.draft(3) == whole.draft(3) == [2, 3, 5]
    with pytest.raises(ValueError):
        PromptLookup(max_draft=0)


def _result(engine, ids, params):
    return [c.result for c in engine.stream_tokens(ids, params) if c.result is not None][0]


class _Oracle(PromptLookup):
    """Drafts the known answer (random tiny models rarely repeat themselves), wrong wherever ``wrong`` says."""

    answer: list[int] = []
    wrong: frozenset[int] = frozenset()  # positions in the answer drafted as another token

    def __init__(self, tokens, *, max_draft):
        super().__init__(tokens, max_draft=max_draft)
        self.prompt_len = len(self)

    def draft(self, limit):
        at = len(self) - self.prompt_len
        n = min(limit, self.max_draft, len(self.answer) - at)
        return [t + 1 if at + i in self.wrong else t for i, t in enumerate(self.answer[at:at + max(n, 0)])]


@pytest.fixture()
def oracle(monkeypatch):
    monkeypatch.setattr(engine_module, "PromptLookup", _Oracle)
    return _Oracle


@pytest.fixture(scope="module")
def fp32_pair(tiny_bundles):
    bundle = tiny_bundles("llama", "fp32")
    on, off = Engine(bundle, energy_meter=None, prompt_lookup=3), Engine(bundle, energy_meter=None)
    yield on, off
    on.close()
    off.close()


@pytest.mark.parametrize("wrong", [(), (0, 5, 6, 11, 20, 21, 22, 30), tuple(range(0, 48, 2))])
def test_drafts_are_checked_and_the_greedy_answer_is_the_one_without_them(fp32_pair, tiny_model_dirs, oracle, monkeypatch, wrong):
    on, off = fp32_pair
    assert (on.prompt_lookup, off.prompt_lookup) == (3, 0)  # off by default
    ids = on.encode(REPETITIVE)
    without = off.generate(REPETITIVE, max_new_tokens=48)
    monkeypatch.setattr(oracle, "answer", without.token_ids)
    monkeypatch.setattr(oracle, "wrong", frozenset(wrong))
    with_drafts = on.generate(REPETITIVE, max_new_tokens=48)
    assert without.usage.draft_tokens == 0
    assert with_drafts.usage.accepted_draft_tokens > 0  # several tokens came out of one step
    assert with_drafts.usage.draft_tokens - with_drafts.usage.accepted_draft_tokens >= (len(wrong) > 0)
    assert with_drafts.token_ids == without.token_ids == hf_greedy(tiny_model_dirs("llama"), ids, 48)[:48]
    assert with_drafts.text == without.text
    for a, b in zip(with_drafts.tokens, without.tokens):  # the signals come from the drafts' rows
        assert (a.id, a.text) == (b.id, b.text)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.entropy == pytest.approx(b.entropy, abs=1e-4)
        assert a.margin == pytest.approx(b.margin, abs=1e-4)


@pytest.mark.parametrize("wrong", [(), (0, 3, 4, 9, 15), tuple(range(0, 24, 2))])
def test_a_sampled_request_drafts_and_a_seed_gives_the_answer_it_gives_without_drafts(fp32_pair, oracle, monkeypatch,
                                                                                      wrong):
    on, off = fp32_pair
    for seed, top_k, top_p in ((3, 0, 1.0), (11, 5, 0.9)):
        params = dict(max_new_tokens=24, temperature=0.8, seed=seed, top_k=top_k, top_p=top_p)
        without = off.generate(REPETITIVE, **params)
        monkeypatch.setattr(oracle, "answer", without.token_ids)
        monkeypatch.setattr(oracle, "wrong", frozenset(wrong))
        drafted = on.generate(REPETITIVE, **params)
        assert drafted.usage.accepted_draft_tokens > 0
        assert drafted.usage.draft_tokens - drafted.usage.accepted_draft_tokens >= (len(wrong) > 0)
        assert drafted.token_ids == without.token_ids and drafted.text == without.text
        streamed = [c.token.id for c in on.stream(REPETITIVE, **params) if c.token is not None]
        assert streamed == without.token_ids


def test_drafts_the_draw_disagrees_with_are_rejected_and_change_nothing(fp32_pair, oracle, monkeypatch):
    # every draft is the greedy answer's token: a hot sampled run often draws another, and that draw stands
    on, off = fp32_pair
    greedy = off.generate(REPETITIVE, max_new_tokens=16).token_ids
    monkeypatch.setattr(oracle, "answer", greedy)
    runs = [(on.generate(REPETITIVE, max_new_tokens=16, temperature=1.5, seed=s),
             off.generate(REPETITIVE, max_new_tokens=16, temperature=1.5, seed=s)) for s in range(6)]
    assert all(a.token_ids == b.token_ids for a, b in runs)
    assert sum(a.usage.draft_tokens - a.usage.accepted_draft_tokens for a, _ in runs) > 0


def test_every_length_and_stop_reason_holds_with_drafts(fp32_pair, oracle, monkeypatch):
    on, off = fp32_pair
    ids = on.encode(REPETITIVE)
    full = _result(off, ids, SamplingParams(max_new_tokens=40))
    assert full.finish_reason == "length"
    monkeypatch.setattr(oracle, "answer", full.token_ids)
    # a draft never runs past max_new_tokens, whatever the step it lands in
    for n in range(1, 41):
        r = _result(on, ids, SamplingParams(max_new_tokens=n))
        assert r.token_ids == full.token_ids[:n] and r.finish_reason == "length"
        assert r.usage.accepted_draft_tokens == r.usage.draft_tokens and (r.usage.draft_tokens > 0) == (n >= 3)
    # a stop string inside a run of accepted drafts ends the answer there, and is not shown
    text = full.text
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text)) if text.index(text[i:i + 3]) == i)
    stopped = _result(on, ids, SamplingParams(max_new_tokens=40, stop=[stop]))
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]


def test_eos_in_a_run_of_accepted_drafts_ends_the_answer(fp32_pair, oracle, monkeypatch):
    on, off = fp32_pair
    ids = on.encode(REPETITIVE)
    full = _result(off, ids, SamplingParams(max_new_tokens=40))
    monkeypatch.setattr(oracle, "answer", full.token_ids)
    eos = full.token_ids[30]
    monkeypatch.setattr(on, "eos_token_ids", frozenset({eos}))
    r = _result(on, ids, SamplingParams(max_new_tokens=40))
    end = full.token_ids.index(eos) + 1
    assert r.finish_reason == "eos" and r.token_ids == full.token_ids[:end]


def test_a_rejected_draft_leaves_no_trace_in_the_cache(fp32_pair, oracle, monkeypatch):
    on, off = fp32_pair
    ids = on.encode(REPETITIVE)
    params = SamplingParams(max_new_tokens=40)
    full = _result(off, ids, params)
    monkeypatch.setattr(oracle, "answer", full.token_ids)
    monkeypatch.setattr(oracle, "wrong", frozenset({3, 9, 10, 17, 39}))
    cache = on.new_cache()
    r = [c.result for c in on.run(cache, ids, params, lambda: False) if c.result is not None][0]
    assert r.token_ids == full.token_ids
    assert r.usage.draft_tokens > r.usage.accepted_draft_tokens > 0
    # every entry is the prompt's or the answer's (the last token is never fed back)
    assert cache.tokens == (ids + r.token_ids)[: cache.length] and cache.length == len(ids) + len(r.token_ids) - 1
    # and a chat session's reuse of those entries gives what a fresh run gives
    more = ids + r.token_ids + on.encode(" seven eight")[1:]
    reused = [c.result for c in on.run(cache, more, params, lambda: False, reuse_decoded=True) if c.result is not None][0]
    assert reused.usage.cached_prompt_tokens > len(ids)
    assert reused.token_ids == _result(off, more, params).token_ids


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_answers_are_repeatable_with_drafts(tiny_bundles, oracle, monkeypatch, precision):
    # int4/int8 kernels compute one row differently from several, so a drafted step may pick another
    # token at a near-tie than a plain one-row step: the answer must still be the same every time
    bundle = tiny_bundles("llama", precision)
    engine = Engine(bundle, energy_meter=None, prompt_lookup=3)
    ids = engine.encode(REPETITIVE)
    params = SamplingParams(max_new_tokens=32, top_logprobs=2)
    monkeypatch.setattr(oracle, "answer", _result(Engine(bundle, energy_meter=None), ids, params).token_ids)
    monkeypatch.setattr(oracle, "wrong", frozenset({4, 12, 13}))
    first = _result(engine, ids, params)
    again = _result(engine, ids, params)  # the pool's cache: its prefix is reused
    fresh = _result(Engine(bundle, energy_meter=None, prompt_lookup=3), ids, params)
    assert first.usage.draft_tokens > 0 and again.usage.cached_prompt_tokens > 0
    for other in (again, fresh):
        assert other.token_ids == first.token_ids
        assert [t.logprob for t in other.tokens] == [t.logprob for t in first.tokens]


def test_cancel_is_seen_between_drafted_steps(fp32_pair, oracle, monkeypatch):
    on, off = fp32_pair
    monkeypatch.setattr(oracle, "answer", off.generate(REPETITIVE, max_new_tokens=150).token_ids)
    cancel = threading.Event()
    seen = 0
    for chunk in on.stream(REPETITIVE, max_new_tokens=150, cancel=cancel):
        if chunk.token is not None:
            seen += 1
            if seen == 3:
                cancel.set()
        if chunk.result is not None:
            result = chunk.result
    # the tokens of the step that was running still come out, nothing more
    assert result.finish_reason == "cancelled" and 3 <= len(result.token_ids) <= 3 + on.prompt_lookup
    assert result.usage.accepted_draft_tokens > 0


@pytest.mark.parametrize("value", [-1, 9, 1.5, True, "3"])
def test_a_bad_prompt_lookup_names_the_field(tiny_bundle, value):
    with pytest.raises(InvalidRequestError, match="prompt_lookup"):
        Engine(tiny_bundle, energy_meter=None, prompt_lookup=value)


def test_the_setting_the_flag_and_the_run_caches_follow_prompt_lookup(tiny_bundle, capsys, monkeypatch):
    import json

    from edge_runtime.cli import main
    from edge_runtime.errors import ConfigError
    from edge_runtime.hybrid import HybridRuntime
    from edge_runtime.runs import engine_key
    from edge_runtime.settings import load_runtime_settings

    settings = load_runtime_settings(data={"engine": {"bundle": str(tiny_bundle)}}, env={"EDGE_RUNTIME_ENGINE_PROMPT_LOOKUP": "2"})
    runtime = HybridRuntime.from_settings(settings)
    try:
        on = runtime.engine
        assert on.prompt_lookup == 2
        off = Engine(tiny_bundle, energy_meter=None)
        # answers decoded with drafts are cached apart, as answers of another onnxruntime are
        import onnxruntime

        assert engine_key(off) == f"{off.model_name}-{off.bundle_hash[:16]}-ort{onnxruntime.__version__}"
        assert engine_key(on) == engine_key(off) + "-lookup2"
    finally:
        runtime.close()
    for bad in (-1, 9):
        with pytest.raises(ConfigError) as info:
            load_runtime_settings(data={"engine": {"prompt_lookup": bad}}, env={})
        assert info.value.field == "engine.prompt_lookup"
    assert main(["generate", str(tiny_bundle), "--prompt", REPETITIVE, "--max-new-tokens", "8", "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)["usage"]
    assert usage["completion_tokens"] == 8 and usage["draft_tokens"] == usage["accepted_draft_tokens"] == 0
    # the flag reaches the engine (a random tiny model seldom repeats itself: the oracle tests show the drafts work)
    seen = []
    real_init = engine_module.Engine.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("prompt_lookup"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "__init__", spy)
    assert main(["generate", str(tiny_bundle), "--prompt", "hi", "--max-new-tokens", "2", "--prompt-lookup", "3"]) == 0
    assert seen == [3]
    capsys.readouterr()
    assert main(["generate", str(tiny_bundle), "--prompt", "hi", "--prompt-lookup", "99"]) != 0
    assert "--prompt-lookup: " in capsys.readouterr().err  # the flag typed, not the API's prompt_lookup
