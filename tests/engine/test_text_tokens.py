"""Which tokens made the text (``text_tokens``) when a token splits a character, and what a cut character's U+FFFD
may match.

SmolLM2's tokenizer has tokens that hold a space and the first bytes of a character (46673 is b" \\xe3\\x81", the
space and two of the three bytes of "お"). The tiny test tokenizer, trained on ASCII, splits every non-ASCII
character into one token per byte, so its last merged token is made such a token here, and the model's choices
are scripted: the case is the same on every machine.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizers import Tokenizer

from edge_runtime.engine import Engine
from edge_runtime.engine import engine as engine_module
from edge_runtime.engine._lookup import PromptLookup
from edge_runtime.engine._text import IncrementalDecoder

SPLIT = " お".encode()[:3]  # b" \xe3\x81": the space and the first two bytes of "お"
REST = "お".encode()[2]  # 0x8a, the last byte, a token of its own


def _splitting_tokenizer(tokenizer: Tokenizer) -> tuple[Tokenizer, int]:
    """``tokenizer`` with its last merged token replaced by one that decodes to ``SPLIT``, and that token's id."""
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    old, tid = max(vocab.items(), key=lambda kv: kv[1])
    char = {b: c for c, b in engine_module._byte_decoder().items()}
    del vocab[old]
    vocab["".join(char[b] for b in SPLIT)] = tid
    pairs = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    spec["model"]["merges"] = [m for m in pairs if old not in (m[0], m[1], m[0] + m[1])]
    return Tokenizer.from_str(json.dumps(spec)), tid


def _byte_token(engine: Engine, byte: int) -> int:
    char = {b: c for c, b in engine_module._byte_decoder().items()}[byte]
    tid = engine.tokenizer.token_to_id(char)
    assert tid is not None
    return tid


def _splitting_engine(bundle, **kwargs) -> tuple[Engine, int]:
    engine = Engine(bundle, energy_meter=None, **kwargs)
    engine.tokenizer, split = _splitting_tokenizer(engine.tokenizer)
    engine._token_text.clear()
    assert engine.token_bytes(split) == list(SPLIT)
    return engine, split


def _script(monkeypatch, answer: list[int]) -> None:
    """The model chooses ``answer``, one token per choice, from the start of the next request."""
    chosen: list[int] = []

    def choose(logits, params, rng):
        chosen.append(answer[len(chosen)])
        return chosen[-1]

    monkeypatch.setattr(engine_module, "choose_token", choose)


class _DraftsTheAnswer(PromptLookup):
    """Drafts the scripted answer: several of its tokens come out of one multi-row step."""

    answer: list[int] = []

    def __init__(self, tokens, *, max_draft):
        super().__init__(tokens, max_draft=max_draft)
        self.prompt_len = len(self)

    def draft(self, limit):
        at = len(self) - self.prompt_len
        return self.answer[at:at + max(min(limit, self.max_draft), 0)]


def _bytes(engine: Engine, tokens) -> bytes:
    return bytes(b for t in tokens for b in engine.token_bytes(t.id))


def test_a_character_counts_at_the_token_holding_its_last_byte(tiny_bundle):
    # the decoder releases " お" when the byte completing "お" comes, but the space is the token before's
    engine, split = _splitting_engine(tiny_bundle)
    h, i = _byte_token(engine, ord("h")), _byte_token(engine, ord("i"))
    decoder = IncrementalDecoder(engine.tokenizer)
    out = [decoder.push(t) for t in (h, i, split, _byte_token(engine, REST), _byte_token(engine, ord("x")))]
    assert out == ["h", "i", "", " お", "x"]
    assert decoder.complete == [1, 2, 3, 4, 5]
    assert [decoder.tokens_holding(n) for n in range(6)] == [0, 1, 2, 3, 4, 5]
    # cut at the end: the stand-in U+FFFD is the last token's, with the bytes before it
    decoder = IncrementalDecoder(engine.tokenizer)
    assert [decoder.push(t) for t in (h, split)] == ["h", ""] and decoder.complete == [1, 2]
    assert decoder.flush() == " \ufffd" and decoder.complete == [1, 3]


def _answer(engine: Engine, split: int) -> tuple[list[int], str]:
    """Some words, then the split token, the byte that completes its "お", and more words; and those words."""
    words = "one two"
    ids = engine.tokenizer.encode(words, add_special_tokens=False).ids
    more = engine.tokenizer.encode(" three four", add_special_tokens=False).ids
    return [*ids, split, _byte_token(engine, REST), *more], words


@pytest.mark.parametrize("how", ["generate", "stream", "chat", "prompt_lookup"])
def test_text_tokens_end_at_the_token_holding_the_space_before_a_stop_string_it_also_begins(
        tiny_bundle, monkeypatch, how):
    # QA: the space came out with the next token's byte, and was counted there: tokens[:text_tokens] rebuilt the
    # text and the whole stop string, and the daemon's logprobs held the cut stop string's last token
    engine, split = _splitting_engine(tiny_bundle, prompt_lookup=3 if how == "prompt_lookup" else 0)
    answer, words = _answer(engine, split)
    _script(monkeypatch, answer)
    kwargs = dict(max_new_tokens=len(answer), stop=["お"])
    ask = "say something"
    if how == "generate":
        r = engine.generate(ask, **kwargs)
    elif how == "stream":
        chunks = list(engine.stream(ask, **kwargs))
        r = chunks[-1].result
        assert "".join(c.text for c in chunks) == r.text
        # paired as the daemon pairs streamed logprobs (a token's entry goes out with the next text; entries still
        # held at the end are dropped), the tokens sent are the text's: one more was sent than the whole answer has
        sent, held = [], []
        for c in chunks:
            held += [c.token] if c.token is not None else []
            if c.text:
                sent, held = sent + held, []
        assert sent == r.tokens[:r.text_tokens]
    elif how == "chat":
        chat = engine.chat_session()
        r = chat.send(ask, **kwargs)
        assert chat.messages[-1] == {"role": "assistant", "content": r.text}
    else:
        monkeypatch.setattr(engine_module, "PromptLookup", _DraftsTheAnswer)
        monkeypatch.setattr(_DraftsTheAnswer, "answer", answer)
        r = engine.generate(ask, **kwargs)
        assert r.usage.accepted_draft_tokens >= 2  # the split token and the one after it came in one step
    at = answer.index(split)
    assert r.finish_reason == "stop" and r.text == words + " " and r.token_ids == answer[:at + 2]
    assert r.text_tokens == at + 1  # the split token holds the text's last character: the space
    held = _bytes(engine, r.tokens[:r.text_tokens])
    assert held.startswith(r.text.encode()) and not held.decode("utf-8", "replace").endswith("お")
    assert r.to_dict()["text_tokens"] == at + 1


def test_a_character_cut_at_the_end_is_held_by_every_token_of_it(tiny_bundle, monkeypatch):
    engine, split = _splitting_engine(tiny_bundle)
    answer, words = _answer(engine, split)
    answer = answer[:answer.index(split) + 1]
    _script(monkeypatch, answer)
    r = engine.generate("say something", max_new_tokens=len(answer))
    assert r.finish_reason == "length" and r.text == words + " \ufffd" and r.text_tokens == len(answer)
    eos = min(engine.eos_token_ids)
    _script(monkeypatch, [*answer, eos])
    r = engine.generate("say something", max_new_tokens=len(answer) + 1)
    assert r.finish_reason == "eos" and r.text == words + " \ufffd" and r.text_tokens == len(answer)


def _stopped_at_fffd(engine: Engine, monkeypatch, answer: list[int]) -> list[Any]:
    """The results of the scripted ``answer`` asked with ``stop=["\\ufffd"]``, generated and streamed (whose chunks
    must spell its text)."""
    results = []
    for stream in (False, True):
        _script(monkeypatch, answer)
        if stream:
            chunks = list(engine.stream("say something", max_new_tokens=len(answer), stop=["\ufffd"]))
            assert "".join(c.text for c in chunks) == chunks[-1].result.text
            results.append(chunks[-1].result)
        else:
            results.append(engine.generate("say something", max_new_tokens=len(answer), stop=["\ufffd"]))
    return results


def test_a_stop_string_does_not_match_the_stand_in_for_a_cut_character(tiny_bundle, monkeypatch):
    # QA: stop=["\ufffd"] ended an answer cut in the middle of a character as "stop", its stand-in dropped
    engine, split = _splitting_engine(tiny_bundle)
    answer, words = _answer(engine, split)
    answer = answer[:answer.index(split) + 1]
    for r in _stopped_at_fffd(engine, monkeypatch, answer):
        assert r.finish_reason == "length" and r.text == words + " \ufffd" and r.text_tokens == len(answer)
    # the whole characters the decoder gives back at the end with it still complete a stop string
    _script(monkeypatch, answer)
    r = engine.generate("say something", max_new_tokens=len(answer), stop=[words[-1] + " "])
    assert r.finish_reason == "stop" and r.text == words[:-1]
    assert _bytes(engine, r.tokens[:r.text_tokens]).startswith(r.text.encode())


def test_a_replacement_character_the_model_writes_is_text_like_any_other(tiny_bundle, monkeypatch):
    # QA: a whole U+FFFD (the bytes EF BF BD; SmolLM2 and Qwen have tokens for it) was taken for a character cut
    # short: held back to the end of the stream (re-decoded at every token), never matched by a stop string, and its
    # text paired with the next token
    engine = Engine(tiny_bundle, energy_meter=None)
    words = engine.tokenizer.encode("one two", add_special_tokens=False).ids
    fffd = [_byte_token(engine, b) for b in "\ufffd".encode()]
    more = engine.tokenizer.encode(" three four", add_special_tokens=False).ids
    answer = [*words, *fffd, *more]
    _script(monkeypatch, answer)
    chunks = list(engine.stream("say something", max_new_tokens=len(answer)))
    shown = [(c.text, c.token.id) for c in chunks if c.token is not None]
    assert ("\ufffd", fffd[-1]) in shown  # out with its last byte's token, not at the end
    assert chunks[-1].result.text == "one two\ufffd three four"
    for r in _stopped_at_fffd(engine, monkeypatch, answer):
        assert r.finish_reason == "stop" and r.text == "one two" and r.token_ids == answer[:len(words) + 3]


def test_pushed_tokens_give_the_text_the_whole_sequence_decodes_to(tiny_bundle):
    # random bytes, cut characters, bytes no character has, and special tokens between the bytes of one character
    import random

    engine = Engine(tiny_bundle, energy_meter=None)
    specials = sorted(engine.eos_token_ids)
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(engine.model.vocab_size)
               for _ in range(rng.randrange(1, 24))]
        decoder = IncrementalDecoder(engine.tokenizer, token_bytes=engine.token_bytes)
        text = "".join(decoder.push(t) for t in ids) + decoder.flush()
        assert text == engine.tokenizer.decode(ids, skip_special_tokens=True), ids
        assert decoder.complete[-1] == len(text)


@pytest.fixture(scope="module")
def byte_fallback_bundle(tmp_path_factory):
    """A tiny llama whose tokenizer is Llama 2's and Mistral's kind: a character outside the vocabulary is one
    "<0xNN>" token per byte, and an incomplete one decodes as one U+FFFD per byte."""
    from tiny_models import make_tiny_model

    from quantize import build_bundle

    root = tmp_path_factory.mktemp("byte-fallback")
    bundle = root / "bundle"
    build_bundle(make_tiny_model(root / "hf", "llama", tokenizer="byte_fallback"), bundle, precision="fp32",
                 name="tiny-byte-fallback", max_ppl_ratio=10.0)
    return bundle


def test_a_byte_fallback_character_counts_at_its_last_bytes_token(byte_fallback_bundle, monkeypatch):
    # QA: held back, a character's byte tokens were counted as whole characters but the last (each U+FFFD taken for
    # one), and the decoder turns the whole run of byte tokens into U+FFFDs, the characters before included:
    # text_tokens stopped short of the text ("日本語" + eos: 4 of 10 tokens), whose bytes then lacked its end
    engine = Engine(byte_fallback_bundle, energy_meter=None)
    eos = min(engine.eos_token_ids)

    def byte_tokens(text: str) -> list[int]:
        return [engine.tokenizer.token_to_id(f"<0x{b:02X}>") for b in text.encode()]

    words = engine.tokenizer.encode("the fox", add_special_tokens=False).ids
    for answer, text in (([*words, *byte_tokens("😀"), eos], "the fox😀"), ([*words, *byte_tokens("😀")], "the fox😀"),
                         ([*byte_tokens("日本語"), eos], "日本語"), ([*words, *byte_tokens("おお"), eos], "the foxおお")):
        for stream in (False, True):
            _script(monkeypatch, answer)
            if stream:
                chunks = list(engine.stream("say something", max_new_tokens=len(answer)))
                assert "".join(c.text for c in chunks) == chunks[-1].result.text
                r = chunks[-1].result
            else:
                r = engine.generate("say something", max_new_tokens=len(answer))
            assert r.text == text and r.text_tokens == len(answer) - (answer[-1] == eos)
            assert _bytes(engine, r.tokens[:r.text_tokens]).decode() == text
        decoder = IncrementalDecoder(engine.tokenizer, token_bytes=engine.token_bytes)
        for token in answer:
            decoder.push(token)
        assert decoder.complete == sorted(decoder.complete)


def test_a_stop_string_does_not_match_a_byte_fallback_characters_stand_ins(byte_fallback_bundle, monkeypatch):
    # QA: cut after three of its four bytes, "😀" decodes as three U+FFFD; only the last was taken for the cut
    # character, and stop=["\ufffd"] matched the other two: the answer ended "stop" with its bytes dropped
    engine = Engine(byte_fallback_bundle, energy_meter=None)
    emoji = [engine.tokenizer.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    words = engine.tokenizer.encode("the fox", add_special_tokens=False).ids
    answer = [*words, *emoji[:3]]
    for r in _stopped_at_fffd(engine, monkeypatch, answer):
        assert r.finish_reason == "length" and r.text == "the fox" + "\ufffd" * 3 and r.text_tokens == len(answer)
