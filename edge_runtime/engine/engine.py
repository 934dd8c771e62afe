"""The embeddable generation engine.

::

    from edge_runtime.engine import Engine

    engine = Engine("~/.cache/edge-runtime/bundles/smollm2-135m-instruct-int4")
    result = engine.generate(messages=[{"role": "user", "content": "What is 2+2?"}], max_new_tokens=16)
    result.text, result.finish_reason, result.tokens[0].logprob, result.energy

    for chunk in engine.stream(prompt="Once upon a time", max_new_tokens=32, temperature=0.8, seed=1):
        print(chunk.text, end="")

A pool of ``max_sessions`` KV caches lets that many generations run at once
(the onnxruntime session is shared). A pooled cache remembers the tokens it
holds, so a request that starts like the previous one (same system prompt,
same few-shot header) only prefills what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import numbers
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._exit import native_call
from .._heap import release_free_heap
from ..bundle import Manifest, VerifyMode, verify_bundle
from ..errors import BundleError, ContextLengthError, EdgeRuntimeError, InvalidRequestError, OutOfMemoryError
from ._lookup import MAX_PROMPT_LOOKUP_TOKENS, PROMPT_LOOKUP_TOKENS, PromptLookup
from ._sampling import choose_token, distribution_signals, log_softmax, signal_scratch
from ._session import KVCache, OrtModel
from ._template import ChatTemplate
from ._text import IncrementalDecoder, StopMatcher
from .types import (
    GenerationResult,
    Message,
    ProviderSpec,
    SamplingParams,
    StreamChunk,
    Timings,
    TokenInfo,
    TRUNCATION_HINT,
    TopLogprob,
    Usage,
    _check_text,
    message_text,
    short_repr,
    validate_messages,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["Engine", "ChatSession", "Cancel", "ScoreResult"]

log = logging.getLogger(__name__)


class _CancelledWhileWaiting(Exception):
    """A request was cancelled before a KV cache (or its chat session) was free for it."""


# a threading.Event, or any zero-argument callable returning True when the caller wants to stop
Cancel = threading.Event | Callable[[], bool] | None

# Long prompts are prefilled in chunks, so a cancel request is seen between them and
# the activations of one chunk bound the arena's peak. 128 measured best here (int4
# SmolLM2, 500-token prompt + 128 tokens): peak RSS 277 MB vs 313 MB with 512-token
# chunks, and the 500-token prefill no slower (314-333 ms vs 331-350 ms).
_PREFILL_CHUNK = 128
# how often a request waiting for a KV cache or its chat session looks at its cancel callable
_CANCEL_POLL_S = 0.05


# texts longer than this are encoded with the GIL released (see Engine._ids): ~10 ms of encoding
_GIL_FREE_ENCODE_CHARS = 16_384
# texts longer than this leave enough freed memory behind their encoding to give back (~15 MB and more)
_TRIM_AFTER_ENCODE_CHARS = 100_000

# what generate()/stream() take as keywords (computed once: sampling_params runs for every request)
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _flag(value: Any, field: str) -> bool:
    """``value`` if it is a bool, else InvalidRequestError naming ``field`` ("no" would have been true)."""
    if not isinstance(value, bool):
        raise InvalidRequestError(f"must be true or false, got {short_repr(value)}", field=field)
    return value


def _prefill_chunks(n: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the prefill runs for ``n`` prompt tokens: every run has two tokens or more when ``n > 1``.

    onnxruntime's 4-bit and 8-bit MatMulNBits kernels take another path for a
    single row (the decode step) than for several, and the logits differ
    (by up to 0.75 on the int4 SmolLM2 bundle); any multi-row run gives the
    same numbers as any other. A one-token last chunk would make a prompt's
    first generated token depend on the prompt's length modulo the chunk size.
    """
    bounds = [(start, min(start + _PREFILL_CHUNK, n)) for start in range(0, n, _PREFILL_CHUNK)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        (a, _), (_, end) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, end - 2), (end - 2, end)]
    return bounds


@contextlib.contextmanager
def _memory_error_as(message: str) -> Iterator[None]:
    """A failed allocation inside (Python's, numpy's) becomes an OutOfMemoryError saying ``message``; ours, raised
    deeper with a more precise message (onnxruntime's std::bad_alloc), passes as it is."""
    try:
        yield
    except OutOfMemoryError:
        raise
    except MemoryError as err:
        raise OutOfMemoryError(message) from err


def _cancel_check(cancel: Cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise InvalidRequestError("must be a threading.Event or a callable", field="cancel")


class ScoreResult:
    """Per-token log-probabilities of a text under the model."""

    def __init__(self, token_ids: list[int], logprobs: np.ndarray, top1: np.ndarray) -> None:
        self.token_ids = token_ids
        self.logprobs = logprobs  # logprob of token i+1 given tokens <= i
        self.top1 = top1  # the model's argmax prediction at each position

    @property
    def nll(self) -> float:
        return float(-self.logprobs.mean()) if self.logprobs.size else 0.0

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Engine:
    """Runs one model bundle. Thread-safe: up to ``max_sessions`` pooled generations (``generate``, ``stream``)
    run concurrently; each chat session holds its own KV cache outside that pool, so it adds to them."""

    # declared here for type checkers: assigned inside __init__'s error translation, they were "Cannot determine type"
    # to mypy in users' code
    manifest: Manifest
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    template: ChatTemplate
    model: OrtModel
    context_length: int  # tokens: prompt plus answer
    max_sessions: int
    prompt_lookup: int
    load_ms: float
    _cache_tokens: int
    _created: int
    _pool_cond: threading.Condition
    _energy_meter: Any
    _byte_level: bool
    _bytes_map: dict[str, int]
    _closed: bool
    _specials: dict[str, int]  # control tokens' texts and ids
    _special_split: re.Pattern[str]
    _strips: dict[str, tuple[bool, bool]]
    _literal: bool
    _later_tokenizer: Any

    def __init__(
        self,
        bundle: str | os.PathLike[str],
        *,
        providers: Sequence[ProviderSpec] | None = None,
        intra_op_threads: int | None = None,
        verify: VerifyMode = "fast",
        max_sessions: int = 1,
        cache_tokens: int = 1024,
        energy_meter: Any = "default",
        session_config: Mapping[str, str] | None = None,
        prompt_lookup: int = PROMPT_LOOKUP_TOKENS,
    ) -> None:
        """Load ``bundle`` (a directory; verified: ``"fast"`` re-hashes only files changed since their stamp).

        ``providers``: onnxruntime execution providers in order of preference, names or ``(name, {option: value})``
        (default: CPU). ``intra_op_threads``: default the physical cores this process may use (affinity mask, cgroup
        quota). ``max_sessions``: pooled generations at once (each a KV cache). ``cache_tokens``: the size a pooled
        KV cache starts at and returns to. ``energy_meter``: ``"default"`` (this device's best source), None, or an
        EnergyMeter. ``prompt_lookup``: 0 to 8 drafted tokens per step (0: off). ``verify``: ``"full"`` hashes every
        file, ``"none"`` checks sizes only. ``session_config``: onnxruntime session config entries (key: value).
        """
        t0 = time.perf_counter()
        if not isinstance(bundle, (str, os.PathLike)):
            raise InvalidRequestError(f"must be a bundle directory, got {type(bundle).__name__}", field="bundle")
        for field, value in (("max_sessions", max_sessions), ("cache_tokens", cache_tokens)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InvalidRequestError(f"must be an integer >= 1, got {value!r}", field=field)
        if (isinstance(prompt_lookup, bool) or not isinstance(prompt_lookup, numbers.Integral)
                or not 0 <= prompt_lookup <= MAX_PROMPT_LOOKUP_TOKENS):
            raise InvalidRequestError(f"must be an integer from 0 to {MAX_PROMPT_LOOKUP_TOKENS}, got {prompt_lookup!r}", field="prompt_lookup")
        self.prompt_lookup = int(prompt_lookup)
        # checked before the model loads: each failed later as a bare AttributeError or TypeError (the meter's
        # only on the first generate)
        if not (energy_meter is None or (isinstance(energy_meter, str) and energy_meter == "default")
                or callable(getattr(energy_meter, "start", None))):
            raise InvalidRequestError(f"must be 'default', None or an EnergyMeter, got {energy_meter!r:.60}",
                                      field="energy_meter")
        if session_config is not None and not isinstance(session_config, Mapping):
            raise InvalidRequestError(f"must be a mapping of onnxruntime session config keys to values, got "
                                      f"{type(session_config).__name__}", field="session_config")
        if providers is not None and (isinstance(providers, (bytes, Mapping)) or not isinstance(providers, (str, Iterable))):
            raise InvalidRequestError(f"must be a list of execution providers, got {type(providers).__name__}",
                                      field="providers")
        with _memory_error_as(f"not enough memory to load {bundle}"):
            self.manifest = verify_bundle(Path(bundle).expanduser(), verify)
            from tokenizers import Tokenizer

            try:
                with native_call():
                    self.tokenizer = Tokenizer.from_file(str(self.manifest.tokenizer_file))
                # a source's tokenizer.json may cut or pad every encoding (a fine-tune saved with truncation at 8,
                # padding to 16): prompts were cut or padded silently; the window's limit is checked here instead
                self.tokenizer.no_truncation()
                self.tokenizer.no_padding()
            except (MemoryError, EdgeRuntimeError):  # (the interpreter exiting: see native_call)
                raise
            except Exception as err:  # tokenizers raises a bare Exception on bad files
                raise BundleError(f"cannot load {self.manifest.tokenizer_file}: {err}") from err
            tokens = self.manifest.raw["tokens"]
            self.eos_token_ids = frozenset(self.manifest.eos_token_ids)
            self.bos_token_id = self.manifest.bos_token_id
            self.template = ChatTemplate(self.manifest.chat_template, bos_token=tokens.get("bos_token") or "", eos_token=tokens.get("eos_token") or "")
            self.model = OrtModel(self.manifest, providers=providers, intra_op_threads=intra_op_threads, session_config=session_config)
            # a bundle handed over with another model's tokenizer (its hash re-made) passed verification: ids past
            # the model's vocabulary read zeros from its embedding, and the answers were silent garbage
            n_tokens = self.tokenizer.get_vocab_size(with_added_tokens=False)  # (with them: 15 ms more)
            if not 0 < n_tokens <= self.model.vocab_size:
                raise self._foreign_tokenizer(f"has {n_tokens} tokens, more than the model's vocabulary" if n_tokens
                                              else "has no tokens")
            self.context_length = self.model.context_length
            self.max_sessions = max_sessions
            self._cache_tokens = cache_tokens
            self._pool: list[KVCache] = []  # caches not in use, the most recently used last
            self._created = 0
            self._pool_cond = threading.Condition()  # guards both; notified when a cache or a place to make one frees
            self._energy_meter = energy_meter
            self._token_text: dict[int, str] = {}
            self._byte_level = self._is_byte_level()
            self._bytes_map = _byte_decoder() if self._byte_level else {}
            self._anchor = self._text_anchor()
            self._chars_per_token: int | None = None  # (see _most_chars_per_token; 0: no bound), computed when first needed
            self._specials, self._special_split = self._control_tokens()
            self._later_tokenizer = self._without_first_prefix()
            # control tokens are read from this table, not encoded, so the check where ids are made does not see them
            far = [(t, i) for t, i in self._specials.items() if i >= self.model.vocab_size]
            if far:
                raise self._foreign_tokenizer(f"gives the control token {far[0][0]!r} the id {far[0][1]}, past the "
                                              "model's vocabulary")
            self.load_ms = (time.perf_counter() - t0) * 1000.0
        self._closed = False

    # ---- properties -------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The bundle's model name (its manifest's ``name``)."""
        return self.manifest.name

    @property
    def precision(self) -> str:
        """``fp32``, ``int8`` or ``int4``."""
        return self.manifest.precision

    @property
    def bundle_hash(self) -> str:
        """What identifies the answers: the bundle's files and its manifest's settings (see ``Manifest.bundle_hash``);
        estimator files and run caches are bound to it."""
        return self.manifest.bundle_hash

    @property
    def legacy_bundle_hash(self) -> str:
        """The files' hash alone, which earlier versions called the bundle hash (estimator files they wrote)."""
        return self.manifest.legacy_bundle_hash

    @property
    def onnxruntime_version(self) -> str:
        """The onnxruntime that runs the model (its quantized kernels change between versions)."""
        return str(self.model._ort.__version__)

    def _is_byte_level(self) -> bool:
        try:
            # the decoder's own state: the whole tokenizer's JSON (to_str) took 96 ms of a 0.5 s load for SmolLM2's
            # and 260 ms for Qwen2.5's
            decoder = json.loads(self.tokenizer.decoder.__getstate__()) if self.tokenizer.decoder is not None else {}
        except (ValueError, TypeError, AttributeError):
            return False
        if not isinstance(decoder, dict):
            return False
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) if isinstance(d, dict)]
        return "ByteLevel" in kinds

    # ---- text <-> tokens --------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the bundle's chat template writes it (to read, not to send back as a raw prompt:
        a raw prompt's control-token texts are read as the tokens, a message's never are)."""
        # a bool: "no" would have been true, and the rendering ended in the assistant's header
        flag = _flag(add_generation_prompt, "add_generation_prompt")
        return self.template.render(validate_messages(messages), add_generation_prompt=flag)

    def encode(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None) -> list[int]:
        """Token ids for a raw prompt (with BOS when the model wants one) or for chat messages (template decides).

        In a message, the text of a control token ("<|im_end|>") is text: read as the token, a user's message (or
        a web page an app forwards) closed its own turn and opened a system one of its own. A raw prompt is the
        caller's own, and may spell a template out with them."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", field="prompt")
        if messages is not None:
            msgs = validate_messages(messages)
            held = [i for i, m in enumerate(msgs) if self._special_split.search(m["content"])]
            if held and not self._literal:
                raise InvalidRequestError("spells one of the model's control tokens, which this model's tokenizer "
                                          "would read as the token: remove its text", field=f"messages[{held[0]}].content")
            if held:
                return self._encode_holding_text(msgs, held)
            return self._ids(self.template.render(msgs, add_generation_prompt=True))
        if not isinstance(prompt, str):
            raise InvalidRequestError("must be a string", field="prompt")
        if not prompt:
            raise InvalidRequestError("must not be empty", field="prompt")
        _check_text(prompt, "prompt")
        ids = self._ids(prompt)
        if self.manifest.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def _control_tokens(self) -> tuple[dict[str, int], re.Pattern[str]]:
        """The special tokens' texts and ids, and a pattern that finds them. The tokenizer itself reads none of
        them from now on (``encode_special_tokens``): :meth:`_ids` puts in those of text that may hold them, as the
        tokenizer did (the whitespace a token strips beside it included)."""
        added = [(i, t) for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special and t.content]
        self._strips = {t.content: (bool(t.lstrip), bool(t.rstrip)) for _, t in added}
        # matched inside words only, or after normalisation: not reproduced here, so the tokenizer keeps reading
        # them, and a message spelling one is refused (see encode)
        self._literal = not any(t.single_word or t.normalized for _, t in added)
        if self._literal:
            self.tokenizer.encode_special_tokens = True
        else:
            log.warning("%s: a special token is matched inside words only or after normalisation; messages that "
                        "spell one are refused", self.manifest.tokenizer_file)
        longest_first = sorted((t.content for _, t in added), key=len, reverse=True)
        pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")" if added else "(?!)")
        return {t.content: i for i, t in added}, pattern

    def _without_first_prefix(self) -> Any:
        """For a tokenizer whose Metaspace pre-tokenizer prefixes only the text's first split (``prepend_scheme:
        "first"``, what transformers writes for SentencePiece tokenizers with ``legacy=False``): the same tokenizer
        prefixing none, for the pieces after a control token; None for any other tokenizer. The engine encodes the
        text between control tokens piece by piece, and each piece got a "▁" that transformers gives only the
        text's start (another model input: fp32 output then differed from transformers')."""
        from tokenizers import Tokenizer

        # the pre-tokenizer's own state, searched, for the common case: serialising the whole tokenizer took 32 ms of
        # every load, and reading its file again 3.5 ms
        pre = self.tokenizer.pre_tokenizer
        if pre is None or b'"prepend_scheme":"first"' not in pre.__getstate__():
            return None
        spec = json.loads(self.tokenizer.to_str())
        found = False
        stack = [spec.get("pre_tokenizer")]
        while stack:
            part = stack.pop()
            if isinstance(part, dict):
                if part.get("type") == "Metaspace" and part.get("prepend_scheme") == "first":
                    part["prepend_scheme"], found = "never", True
                stack += part.get("pretokenizers") or []
        if not found:
            return None
        later = Tokenizer.from_str(json.dumps(spec))
        later.encode_special_tokens = self.tokenizer.encode_special_tokens
        return later

    def _pieces(self, text: str, fill: Callable[[str], str] | None = None) -> list[tuple[str, bool]]:
        """``text`` cut at control tokens' texts (each its own piece, marked True), the pieces between them rewritten
        by ``fill`` (see :meth:`_ids`), then the whitespace a token strips removed: from the filled text, as the
        tokenizer strips a message's own whitespace (stripped before, a stand-in lost it and the message kept it)."""
        pieces = [(p, p in self._specials) for p in self._special_split.split(text) if p]
        if fill is not None:
            pieces = [(p, True) if special else (fill(p), False) for p, special in pieces]
        for k, (piece, special) in enumerate(pieces):
            if special:
                lstrip, rstrip = self._strips[piece]
                if lstrip and k and not pieces[k - 1][1]:
                    pieces[k - 1] = (pieces[k - 1][0].rstrip(), False)
                if rstrip and k + 1 < len(pieces) and not pieces[k + 1][1]:
                    pieces[k + 1] = (pieces[k + 1][0].lstrip(), False)
        return pieces

    def _encode_holding_text(self, msgs: list[dict[str, str]], held: list[int]) -> list[int]:
        """Token ids of a conversation some of whose messages spell control tokens: the template renders
        stand-ins for those messages, its own control tokens are taken from that text, and the messages' text is
        put back in the pieces between them, so each piece is encoded as a normal encode would cut it."""
        nonce = secrets.token_hex(8)  # no text sends it: a stand-in cannot be forged either
        marks = {f"\ue000{nonce}{i}\ue001": msgs[i]["content"] for i in held}
        shown = [{**m, "content": f"\ue000{nonce}{i}\ue001"} if i in held else m for i, m in enumerate(msgs)]
        rendered = self.template.render(shown, add_generation_prompt=True)
        mark = re.compile("|".join(map(re.escape, marks)))

        def restore(text: str) -> str:
            return mark.sub(lambda m: marks[m.group()], text)

        real = self.template.render(msgs, add_generation_prompt=True)
        if restore(rendered) != real:
            # the template rewrites a message's text (a trimming one): rendered stand-ins trimmed the same way
            marks = {k: v.strip() for k, v in marks.items()}
            if restore(rendered) != real:
                raise InvalidRequestError("spells one of the model's control tokens, and this model's chat template "
                                          "changes the text it renders: remove the token's text",
                                          field=f"messages[{held[0]}].content")
        return self._ids(rendered, fill=restore)

    def _ids(self, text: str, *, fill: Callable[[str], str] | None = None) -> list[int]:
        """Ids of text whose control tokens' texts are the tokens (a rendered template, a raw prompt); ``fill``
        rewrites each piece between them before it is encoded (the messages put back for their stand-ins)."""
        if not self._literal:  # (see _control_tokens) the tokenizer reads them itself
            return self._encode_text(text)
        ids: list[int] = []
        # (a filled piece may spell a control token: what is one is marked, never looked up)
        for k, (piece, special) in enumerate(self._pieces(text, fill)):
            if special:
                ids.append(self._specials[piece])
            elif piece:
                ids += self._encode_text(piece, first=k == 0)
        return ids

    def _encode_text(self, text: str, *, first: bool = True) -> list[int]:
        """Ids of plain text: the tokenizer reads no control token in it (see _control_tokens). ``first``: the text
        starts the whole text, not a piece after a control token (see _without_first_prefix)."""
        tokenizer = self.tokenizer if first or self._later_tokenizer is None else self._later_tokenizer
        if len(text) > _GIL_FREE_ENCODE_CHARS:
            # encode_batch gives the same ids but releases the GIL while it works (encode holds it: 0.4 s for
            # a 1 MB prompt, while a daemon's event loop could serve nobody); on short text its thread pool
            # costs more than it saves (2-3 ms a request beside onnxruntime's spinning threads)
            with native_call():  # (an exit meanwhile waits for it: see edge_runtime._exit)
                ids = tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
            if len(text) > _TRIM_AFTER_ENCODE_CHARS:  # the encoding's tens of MB, freed: given back (see _heap)
                release_free_heap()
        else:
            ids = tokenizer.encode(text, add_special_tokens=False).ids
        if ids and max(ids) >= self.model.vocab_size:
            # a tokenizer whose ids reach past the embedding table (its count fits: checked at load), which would
            # read zeros there and answer garbage; finding the largest id at load costs 50-190 ms
            raise self._foreign_tokenizer(f"gave the token id {max(ids)}, past the model's vocabulary")
        return ids

    def _foreign_tokenizer(self, says: str) -> BundleError:
        """The error for a tokenizer that is not this model's (another model's, its hash re-made); ``says`` how."""
        return BundleError(f"{self.manifest.tokenizer_file} {says} (manifest model.vocab_size = "
                           f"{self.model.vocab_size}): not this model's tokenizer")

    def count_tokens(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None) -> int:
        """How many tokens :meth:`encode` gives (the prompt's share of the context window)."""
        return len(self.encode(prompt, messages=messages))

    def token_text(self, token_id: int) -> str:
        """A token's text as it reads inside a text (special tokens included): SentencePiece's "▁the" is " the".

        Decoded after an anchor token, not alone: a SentencePiece decoder drops the word-start space of a text's first
        piece, so decoded alone "▁the" gave "the" and the tokens' texts and bytes no longer made up the answer. The
        answer's own first token still loses that space in the answer's text, as the tokenizer's decode has it."""
        text = self._token_text.get(token_id)
        if text is None:
            self._token_ids([token_id], "token_id")  # -1 raised OverflowError, an id past the vocabulary gave ''
            text = None
            if self._anchor is not None:
                anchor, before = self._anchor
                within = self.tokenizer.decode([anchor, token_id], skip_special_tokens=False)
                text = within[len(before):] if within.startswith(before) else None
            if text is None:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def _text_anchor(self) -> tuple[int, str] | None:
        """A plain token and its text, after which :meth:`token_text` decodes a token; None for a byte-level
        vocabulary, whose tokens decode alone as they read inside a text."""
        if self._byte_level:
            return None
        ids = self.tokenizer.encode("a", add_special_tokens=False).ids
        if len(ids) != 1:
            return None
        return ids[0], self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int] | None:
        """The exact UTF-8 bytes of a token (OpenAI's ``bytes`` field); None when they are not known (a piece that is
        not bytes in a vocabulary that is not byte-level). An id outside the vocabulary is an InvalidRequestError."""
        self._token_ids([token_id], "token_id")  # -1 raised OverflowError, an id past the vocabulary gave None
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return None
        if self._byte_level and all(ch in self._bytes_map for ch in piece):
            return [self._bytes_map[ch] for ch in piece]
        byte = _BYTE_FALLBACK.fullmatch(piece)
        if byte:  # SentencePiece's byte fallback (Llama 2, Mistral, Gemma): part of a character, as "<0xE2>"
            return [int(byte.group(1), 16)]
        text = self.token_text(token_id)
        return None if "\ufffd" in text else list(text.encode("utf-8"))

    # ---- KV cache pool ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _cache(self, cancel: Callable[[], bool] | None = None) -> Iterator[KVCache]:
        """A KV cache from the pool, a new one while under ``max_sessions``, or else the next one given back.

        An open stream holds its cache until it is consumed or closed (see Engine.stream), so the wait can be
        long: ``cancel`` is checked during it (``_CancelledWhileWaiting``), and :meth:`close` ends it.
        """
        cache: KVCache | None = None
        with self._pool_cond:
            while True:
                if self._closed:
                    raise EdgeRuntimeError("engine is closed")
                if self._pool:
                    cache = self._pool.pop()
                    break
                if self._created < self.max_sessions:
                    self._created += 1  # a new one, made below
                    break
                if cancel is not None and cancel():
                    raise _CancelledWhileWaiting
                # a cancel is a callable, not an event: looked at a few times a second
                self._pool_cond.wait(_CANCEL_POLL_S if cancel is not None else None)
        try:
            if cache is None:
                cache = self.new_cache()
            yield cache
        finally:
            if cache is not None and not self._closed and cache.capacity > 2 * self._cache_tokens:
                try:
                    # a long request grew it (45 KiB a token for SmolLM2: 360 MiB at 8k), and a daemon kept that
                    # for good; back to what the engine starts with, the prompt's first tokens kept for reuse.
                    # Not for a little growth: remapping and copying it back took ~50 ms a request just past it
                    cache.shrink(self._cache_tokens)
                except MemoryError:  # even the small buffers could not be had: the cache goes, as a failed one
                    cache = None
            with self._pool_cond:
                if cache is not None and not self._closed:
                    self._pool.append(cache)
                else:
                    # a closed engine's cache is dropped (it serves no one); an allocation that failed frees its
                    # place for a request waiting now or later
                    self._created -= 1
                self._pool_cond.notify()

    def new_cache(self) -> KVCache:
        """A KV cache outside the pool (a chat session keeps one for its whole life)."""
        with _memory_error_as("not enough memory for a KV cache"):
            return self.model.new_cache(self._cache_tokens)

    # ---- generation -------------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
        """``params`` with keyword overrides, or SamplingParams built from them; errors name the field."""
        if params is not None and not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"must be a SamplingParams (or give its fields as keywords), got "
                                      f"{type(params).__name__}", field="params")
        for name in overrides:
            if name not in _SAMPLING_FIELDS:
                raise InvalidRequestError(f"unknown sampling setting (known: {', '.join(sorted(_SAMPLING_FIELDS))})",
                                          field=name)
        try:
            if params is None:
                return SamplingParams(**overrides)
            return params.replace(**overrides) if overrides else params
        except TypeError as err:  # an unknown keyword
            raise InvalidRequestError(str(err), field="params") from err

    @property
    def energy_meter(self) -> Any:
        """The EnergyMeter that measures each generation (None: not measured)."""
        return self._meter()

    def _meter(self) -> Any:
        if self._energy_meter == "default":
            from ..power import default_meter

            return default_meter()
        return self._energy_meter

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        params: SamplingParams | None = None,
        cancel: Cancel = None,
        prompt_nll: bool = False,
        **sampling: Any,
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` (raw text) or ``messages`` (rendered with the bundle's chat template).

        Sampling is ``params`` or keyword arguments naming :class:`SamplingParams` fields (``max_new_tokens``
        defaults to 256). ``cancel``: a ``threading.Event`` or a callable, checked every step; the result then ends
        ``finish_reason == "cancelled"``. ``prompt_nll``: also measure the prompt's own log-likelihood (for
        estimators that read it). Raises ``InvalidRequestError`` naming a bad field, ``ContextLengthError`` when
        the prompt plus ``max_new_tokens`` does not fit, both before any work.
        """
        result = None
        for chunk in self.stream(prompt, messages=messages, params=params, cancel=cancel, prompt_nll=prompt_nll, **sampling):
            if chunk.result is not None:
                result = chunk.result
        assert result is not None
        return result

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] | None = None,
        params: SamplingParams | None = None,
        cancel: Cancel = None,
        prompt_nll: bool = False,
        **sampling: Any,
    ) -> Iterator[StreamChunk]:
        """Yield text as it is generated; the last chunk carries the full result.

        Validation (parameters, messages, context window) happens before the
        first chunk, so a bad request raises without spending any compute. The
        stream holds one of the engine's KV caches until it is consumed or
        closed: with ``max_sessions=1``, finish or close it before the same
        thread asks for another generation, or that request waits for it.
        """
        self._check_open()
        p = self.sampling_params(params, sampling)
        if not p.truncate_prompt:
            self.refuse_overlong(prompt, messages=messages, max_new_tokens=p.max_new_tokens)
        if messages is not None and prompt is None:
            ids = self.fit_messages(messages, p)
        else:
            ids = self.fit_context(self.encode(prompt, messages=messages), p, field="prompt")
        is_cancelled = _cancel_check(cancel)
        return self._stream(ids, p, is_cancelled, _flag(prompt_nll, "prompt_nll"))

    def stream_tokens(self, ids: Sequence[int], params: SamplingParams, *, cancel: Cancel = None,
                      prompt_nll: bool = False) -> Iterator[StreamChunk]:
        """:meth:`stream` for prompt token ids the caller already has (truncated with :meth:`fit_context` if wanted).

        A prompt that does not fit with ``max_new_tokens`` raises here, before any token, as in :meth:`stream`.
        """
        self._check_open()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"must be a SamplingParams, got {type(params).__name__}", field="params")
        ids = self.fit_context(self._token_ids(ids, "ids"), params, field="ids")
        return self._stream(ids, params, _cancel_check(cancel), _flag(prompt_nll, "prompt_nll"))

    def _check_open(self) -> None:
        # at the call, not at the stream's first next(): a generator's body runs only then
        if self._closed:
            raise EdgeRuntimeError("engine is closed")

    def _token_ids(self, ids: Any, field: str) -> list[int]:
        """``ids`` as a list of ints in the vocabulary, or InvalidRequestError naming ``field``."""
        # a list, a tuple, a numpy array: anything iterable but text and mappings
        if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            raise InvalidRequestError(f"must be a list of token ids, got {type(ids).__name__}", field=field)
        ids = list(ids)
        if not ids:
            raise InvalidRequestError("must not be empty", field=field)
        vocab = self.model.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in ids):  # the tokenizer's ids pass this quick check
            # onnxruntime's Gather reads zeros for an id past the vocabulary, and from the end for a negative one
            if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"must be token ids from 0 to {vocab - 1}", field=field)
            ids = [int(t) for t in ids]
        return ids

    def _stream(self, ids: list[int], p: SamplingParams, is_cancelled: Callable[[], bool], prompt_nll: bool) -> Iterator[StreamChunk]:
        t_start = time.perf_counter()
        try:
            with self._cache(is_cancelled) as cache:
                yield from self.run(cache, ids, p, is_cancelled, prompt_nll=prompt_nll, started=t_start)
        except _CancelledWhileWaiting:  # cancelled before its turn came: nothing was computed
            yield StreamChunk("", None, self._not_started(ids, t_start))

    def _not_started(self, ids: list[int], t_start: float) -> GenerationResult:
        """The result of a request cancelled while it waited for a KV cache or its chat session."""
        waited_ms = (time.perf_counter() - t_start) * 1000.0
        return GenerationResult(text="", token_ids=[], finish_reason="cancelled", tokens=[],
                                usage=Usage(prompt_tokens=len(ids), completion_tokens=0),
                                timings=Timings(load_ms=self.load_ms, prefill_ms=0.0, decode_ms=0.0, ttft_ms=waited_ms),
                                model=self.model_name)

    def fit_context(self, ids: list[int], p: SamplingParams, *, field: str = "messages") -> list[int]:
        """The prompt ids if they fit with ``max_new_tokens``; truncated when asked; else ContextLengthError."""
        limit = self.context_length
        if len(ids) + p.max_new_tokens <= limit:
            return ids
        if p.max_new_tokens >= limit:
            raise ContextLengthError(f"max_new_tokens {p.max_new_tokens} does not fit the context window of {limit} tokens", field="max_new_tokens")
        if p.truncate_prompt:
            room = limit - p.max_new_tokens
            if room > 1 and self.manifest.add_bos_token and ids[0] == self.bos_token_id:
                # the BOS that this model reads before any text (Llama, Mistral) stays, as transformers truncates a
                # text and not its special tokens: cut with the rest, the model read the kept text from no start
                return [ids[0], *ids[len(ids) - room + 1:]]
            return ids[len(ids) - room:]
        raise ContextLengthError(
            f"the prompt has {len(ids)} tokens and max_new_tokens is {p.max_new_tokens}: together they exceed "
            f"the context window of {limit} tokens (shorten the prompt or lower max_new_tokens{TRUNCATION_HINT})",
            field=field,
        )

    def refuse_overlong(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                        max_new_tokens: int = 0) -> None:
        """ContextLengthError for a prompt whose length in characters alone proves that it cannot fit beside
        ``max_new_tokens`` (0: no length was asked for), before it is tokenized (a 900 kB prompt took 0.6 s and
        ~140 MiB to count); otherwise nothing, and :meth:`encode` counts. No token of this model's vocabulary spells
        more than a known number of characters, so a text holds at least its length over that many tokens (a text
        shorter than the room left is not looked at)."""
        room = self.context_length - max_new_tokens
        if room <= 0 or (prompt is None) == (messages is None):
            return  # fit_context and encode name what is wrong
        if messages is not None:
            msgs = validate_messages(messages)
            if sum(len(m["content"]) for m in msgs) <= room:
                return
            text, field = self.template.render(msgs, add_generation_prompt=True), "messages"
        elif isinstance(prompt, str) and len(prompt) > room:
            text, field = prompt, "prompt"
        else:
            return  # short, or not text: encode says what is wrong with it
        per_token = self._most_chars_per_token()
        least = len(text) // per_token if per_token else 0
        if least > room:
            raise ContextLengthError(
                f"the prompt is {len(text):,} characters, so at least {least:,} tokens (no token of this model spells "
                f"more than {per_token} characters): more than the context window of {self.context_length} tokens "
                + (f"leaves beside max_new_tokens {max_new_tokens} (shorten the prompt or lower max_new_tokens"
                   if max_new_tokens else "holds (shorten the prompt") + f"{TRUNCATION_HINT})", field=field)

    def _most_chars_per_token(self) -> int | None:
        """The most characters of a text one token can stand for; None when the tokenizer's normalizer may shorten
        a text by more than NFC does (whose compositions join at most 3 code points into one, bounded by 4 here)."""
        if self._chars_per_token is None:
            found = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
            normalizer = self.tokenizer.normalizer
            if normalizer is not None:
                kinds = set(re.findall(r'"type":"(\w+)"', normalizer.__getstate__().decode("utf-8", "replace")))
                if not kinds <= {"Sequence", "NFC", "NFKC", "NFD", "NFKD", "Prepend"}:
                    found = 0  # Replace, Strip, Precompiled, ...: no bound known
                elif kinds & {"NFC", "NFKC"}:
                    found *= 4
            self._chars_per_token = found
        return self._chars_per_token or None

    def fit_messages(self, messages: Sequence[Message], p: SamplingParams, *, field: str = "messages") -> list[int]:
        """The token ids of a conversation, fitting beside ``max_new_tokens`` (else ContextLengthError).

        With ``truncate_prompt`` a conversation stays a conversation: cutting its token ids from the start (what
        :meth:`fit_context` does to a raw prompt) dropped the BOS, the system prompt and the template's header,
        and the model read text that began mid-word. Here the system messages and the last message are kept,
        whole turns are dropped oldest first, and only when the last message alone is too long is its text cut
        from its start, inside the template's framing.
        """
        msgs = validate_messages(messages)
        ids = self.encode(messages=msgs)
        budget = self.context_length - p.max_new_tokens
        if not p.truncate_prompt or len(ids) <= budget or budget <= 0:
            return self.fit_context(ids, p, field=field)
        droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] not in ("system", "developer")]
        if msgs[-1]["role"] != "user":  # an answer being continued, or a tool's result, keeps its whole turn
            asked = [i for i in droppable if msgs[i]["role"] == "user"]
            if asked:
                droppable = [i for i in droppable if i < asked[-1]]

        def without(k: int) -> list[dict[str, str]]:
            gone = set(droppable[:k])
            return [m for i, m in enumerate(msgs) if i not in gone]

        if droppable:
            # the fewest oldest turns to drop (a prompt only gets shorter as more go)
            k = _smallest(1, len(droppable), lambda k: len(self.encode(messages=without(k))) <= budget)
            # nor an answer (or a tool's result) whose question went: the kept history starts with a user's turn
            while k < len(droppable) and msgs[droppable[k]]["role"] != "user":
                k += 1
            msgs = without(k)
            ids = self.encode(messages=msgs)
        if len(ids) <= budget:
            return ids
        # the last message alone is too long: the fewest leading characters of its text to drop, found by
        # rendering it again (a template may trim or escape the text, so it is not looked for in the rendering)
        *before, last = msgs
        content = last["content"]

        def cut(drop: int) -> list[int]:
            return self.encode(messages=[*before, {**last, "content": content[drop:]}])

        if len(content) > 1:
            drop = _smallest(1, len(content) - 1, lambda d: len(cut(d)) <= budget)
            if len(fitted := cut(drop)) <= budget:
                return fitted
        return self.fit_context(ids, p, field=field)  # even the framing does not fit: the prompt's end

    def run(
        self,
        cache: KVCache,
        ids: list[int],
        p: SamplingParams,
        is_cancelled: Callable[[], bool],
        *,
        prompt_nll: bool = False,
        reuse_decoded: bool = False,
        started: float | None = None,
    ) -> Iterator[StreamChunk]:
        """The generation loop on a given cache (shared by the pool and chat sessions).

        ``started``: the ``time.perf_counter()`` at which the request was made, before it waited for ``cache`` (or
        its chat session); ``ttft_ms`` counts from it (default: now), ``prefill_ms`` from now.

        The cached prefix is reused only as far as its keys and values came from
        multi-row prefill runs, the way a fresh request computes them: a generated
        token's entries come from a one-row decode step, which the quantized kernels
        compute differently, so a request reusing them would not repeat the answer
        of the same request run fresh. ``reuse_decoded`` (a chat session) reuses them
        too: a follow-up turn then prefills only the new message, and its answer may
        differ at a near-tie from a fresh run of the whole conversation (int4/int8).
        """
        t_start = time.perf_counter()
        t_request = t_start if started is None else started
        meter = self._meter()
        window = meter.start() if meter is not None else None
        try:
            # Reuse the cached prefix, but run the prompt's last two tokens again: the
            # next-token logits must come from a multi-row run, as in a fresh prefill
            # (see _prefill_chunks), or a repeated request would not repeat its answer.
            common = 0
            if not prompt_nll:
                limit = min(len(cache.tokens) if reuse_decoded else cache.prefilled, len(ids) - 2)
                while common < limit and cache.tokens[common] == ids[common]:
                    common += 1
            cache.truncate(common)
            if not reuse_decoded:  # a pooled cache (a chat session's grows turn by turn: by doubling)
                # the prompt and the most the answer can take (drafts are never checked past max_new_tokens)
                cache.reserve(len(ids) + p.max_new_tokens, exact=True)
            todo = ids[common:]
            nll_sum, nll_count = 0.0, 0
            logits: np.ndarray | None = None
            cancelled = False
            for start, end in _prefill_chunks(len(todo)):
                if is_cancelled():
                    cancelled = True
                    break
                chunk_ids = todo[start:end]
                out = cache.prefill(chunk_ids, all_logits=prompt_nll)
                if prompt_nll:
                    # position i predicts token i+1: the rest of this chunk, then the next chunk's first token
                    targets = todo[start + 1:start + 1 + len(chunk_ids)]
                    lp = log_softmax(out[: len(targets)])
                    nll_sum -= float(lp[np.arange(len(targets)), targets].sum())
                    nll_count += len(targets)
                logits = out[-1]
            t_prefill = time.perf_counter()
            rng = np.random.default_rng(p.seed) if p.temperature > 0 else None
            scratch = signal_scratch(self.model.vocab_size)
            decoder = IncrementalDecoder(self.tokenizer, token_bytes=self.token_bytes)
            stops = StopMatcher(p.stop)
            # a stop string spelling a special token is matched by the token's id: the decoder skips special tokens,
            # so their text never reaches the matcher (a stop of "<|endoftext|>" ran on to max_new_tokens)
            stop_ids = {self._specials[s] for s in p.stop if s in self._specials}
            generated: list[int] = []
            infos: list[TokenInfo] = []
            texts: list[str] = []
            shown = 0  # characters shown so far
            finish = "cancelled" if cancelled else "length"
            hit = False  # a stop string cut the text
            t_first = t_prefill
            # Sampled requests draft too: each token is still drawn from the model's own (row's) distribution with
            # the same random numbers as without drafts, and a draft counts only when the draw equals it. For a
            # draft that is one token for sure, that is speculative sampling's rule (accept with probability p(d),
            # else draw from p without d), so the answer's distribution and a seed's answer are unchanged.
            lookup = PromptLookup(ids, max_draft=self.prompt_lookup) if self.prompt_lookup else None
            rows: list[np.ndarray] = []  # logits of the last step's rows not used yet: rows[i] follows drafted[i]
            drafted: list[int] = []  # the last step's drafted tokens not checked yet (they are in the cache)
            n_drafted = n_accepted = 0
            prev: int | None = None  # the last chosen token: fed to the next step unless a row after it is left
            while not cancelled and len(generated) < p.max_new_tokens:
                if rows:
                    logits = rows.pop(0)
                elif prev is not None:
                    if is_cancelled():
                        finish = "cancelled"
                        break
                    draft = lookup.draft(p.max_new_tokens - len(generated) - 1) if lookup is not None else None
                    if draft:
                        # One run checks the drafts: row 0 gives the next token as a plain step would;
                        # while the chosen tokens equal the drafts, the rows after them give the tokens after.
                        out = cache.step_many([prev, *draft])
                        logits, rows, drafted = out[0], list(out[1:]), draft
                        n_drafted += len(draft)
                    else:
                        logits = cache.step(prev)
                assert logits is not None
                tid = choose_token(logits, p, rng)
                if drafted:
                    if tid == drafted[0]:
                        drafted.pop(0)
                        n_accepted += 1
                    else:  # the rest of the drafts are wrong: forget their rows and their cache entries
                        cache.truncate(cache.length - len(drafted))
                        rows, drafted = [], []
                if lookup is not None:
                    lookup.extend((tid,))
                # greedy (no rng): the choice is the argmax, which the signals need not find again
                sig = distribution_signals(logits, tid, p.top_logprobs, top1=tid if rng is None else None, scratch=scratch)
                info = TokenInfo(
                    id=tid, text=self.token_text(tid), logprob=sig.logprob, entropy=sig.entropy, margin=sig.margin,
                    top_logprobs=None if sig.top_ids is None else tuple(
                        TopLogprob(id=int(i), token=self.token_text(int(i)), logprob=float(lp), bytes=self.token_bytes(int(i)))
                        for i, lp in zip(sig.top_ids, sig.top_logprobs)
                    ),
                )
                if not generated:
                    t_first = time.perf_counter()
                generated.append(tid)
                infos.append(info)
                if tid in self.eos_token_ids or tid in stop_ids:
                    finish = "eos" if tid in self.eos_token_ids else "stop"
                    yield StreamChunk("", info)
                    break
                safe, hit = stops.feed(decoder.push(tid))
                texts.append(safe)
                shown += len(safe)
                if safe and decoder.tokens_holding(shown) < len(decoder.complete):
                    # all of it is earlier tokens' text (this token completed a character they began, then a stop
                    # string cut it; or the stop matcher held it): it comes out on its own, so a consumer pairing
                    # text with the token it came with (the daemon's streamed logprobs) does not credit this one
                    yield StreamChunk(safe, tokens_shown=decoder.tokens_holding(shown))
                    yield StreamChunk("", info)
                else:
                    yield StreamChunk(safe, info)
                if hit:
                    finish = "stop"
                    break
                prev = tid
            if not hit:  # what the decoder and the stop matcher still hold comes out (an eos or a special stop too)
                flushed = decoder.flush()
                # an incomplete last character comes out as U+FFFD (one per byte with a byte fallback): generated
                # bytes, not text a stop string can match ("\ufffd" stopped at it); the whole characters before it
                # may still complete one
                cut = flushed[max(len(flushed) - decoder.cut, 0):] if decoder.cut else ""
                tail, hit = stops.feed(flushed[:len(flushed) - len(cut)])
                tail += "" if hit else stops.flush() + cut
                if hit:
                    finish = "stop"
                if tail:  # held back until the end
                    texts.append(tail)
                    shown += len(tail)
                    yield StreamChunk(tail, tokens_shown=decoder.tokens_holding(shown))
            # the tokens that hold the text shown (by a character's last byte, not the token that released it): the
            # last may also hold a stop string's start; the rest are an eos's or a cut stop string's
            text_tokens = decoder.tokens_holding(shown)
            t_end = time.perf_counter()
            energy = None
            if window is not None:
                window.stop()
                energy = window.to_report()
                window = None
            result = GenerationResult(
                text="".join(texts),
                token_ids=generated,
                finish_reason=finish,  # type: ignore[arg-type]
                tokens=infos,
                usage=Usage(prompt_tokens=len(ids), completion_tokens=len(generated), cached_prompt_tokens=common,
                            draft_tokens=n_drafted, accepted_draft_tokens=n_accepted),
                timings=Timings(
                    load_ms=self.load_ms,
                    prefill_ms=(t_prefill - t_start) * 1000.0,
                    decode_ms=(t_end - t_first) * 1000.0 if generated else 0.0,
                    ttft_ms=(t_first - t_request) * 1000.0,
                ),
                energy=energy,
                # the whole prompt's, or none: a prefill cancelled part-way scored only its first chunks
                prompt_nll=nll_sum / nll_count if nll_count and not cancelled else None,
                model=self.model_name,
                text_tokens=text_tokens,
            )
            yield StreamChunk("", None, result)
        except OutOfMemoryError:
            raise
        except MemoryError as err:  # numpy's arrays (the KV cache growing, the signals) or Python's own
            raise OutOfMemoryError(f"not enough memory to run this request ({len(ids)} prompt tokens)") from err
        finally:
            if window is not None:
                window.stop()

    # ---- scoring ----------------------------------------------------------------------------

    def next_token_logprobs(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                            truncate: bool = False) -> np.ndarray:
        """Log-probabilities of the token that would follow the prompt (one prefill, no decoding).

        A prompt longer than the context window is an error, or with ``truncate``
        loses its beginning (the end is what the next token depends on most).
        """
        # named here: SamplingParams named it truncate_prompt, which this method has not
        p = SamplingParams(max_new_tokens=1, truncate_prompt=_flag(truncate, "truncate"))
        try:
            if messages is not None and prompt is None:
                ids = self.fit_messages(messages, p)
            else:
                ids = self.fit_context(self.encode(prompt, messages=messages), p, field="prompt")
        except ContextLengthError as err:  # its advice names generation's arguments, which this method has not
            raise ContextLengthError(f"the prompt has more tokens than the context window of {self.context_length} "
                                     "leaves for one more (shorten it, or pass truncate=True to keep its end)",
                                     field=err.field) from err
        with self._cache() as cache:
            cache.truncate(0)
            cache.reserve(len(ids), exact=True)  # grown once, as for a generation (see run)
            for start, end in _prefill_chunks(len(ids)):  # the same runs as generation's prefill
                logits = cache.prefill(ids[start:end])[-1]
        return log_softmax(logits)

    def score(self, text: str | None = None, *, token_ids: Sequence[int] | None = None, chunk: int = 256) -> ScoreResult:
        """Log-probability of every token of a text given what precedes it (perplexity, quality checks)."""
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise InvalidRequestError(f"must be an integer >= 1, got {chunk!r}", field="chunk")
        field = "text" if token_ids is None else "token_ids"
        if text is not None and token_ids is not None:  # token_ids were scored, and the text silently not
            raise InvalidRequestError("give text or token_ids, not both", field="text")
        if token_ids is not None:
            ids = self._token_ids(token_ids, "token_ids")
        elif text is None:
            raise InvalidRequestError("give text or token_ids", field="text")
        else:
            try:
                ids = self.encode(text)
            except InvalidRequestError as err:  # named encode's own argument, which score does not have
                if err.field != "prompt":
                    raise
                raise type(err)(str(err).removeprefix("prompt: "), field="text") from None
        if len(ids) < 2:
            raise InvalidRequestError("needs at least two tokens", field=field)
        if len(ids) > self.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the context window of {self.context_length}", field=field)
        lps: list[np.ndarray] = []
        top1: list[np.ndarray] = []
        with self._cache() as cache:
            cache.truncate(0)
            cache.reserve(len(ids), exact=True)
            for start in range(0, len(ids) - 1, chunk):
                part = ids[start:start + chunk]
                logits = cache.prefill(part, all_logits=True)
                targets = ids[start + 1:start + 1 + len(part)]
                lp = log_softmax(logits[: len(targets)])
                lps.append(lp[np.arange(len(targets)), targets])
                top1.append(np.argmax(logits[: len(targets)], axis=-1))
            cache.truncate(0)
        return ScoreResult(ids, np.concatenate(lps), np.concatenate(top1))

    # ---- chat sessions ----------------------------------------------------------------------

    def chat_session(self, system: str | None = None) -> ChatSession:
        """A conversation that keeps its own KV cache between turns (see :class:`ChatSession`)."""
        self._check_open()  # before it allocates a KV cache no turn could use
        return ChatSession(self, system=system)

    def close(self) -> None:
        """Serve no one from now: requests waiting for a KV cache fail, and the pool's caches are freed. A stream
        already running finishes; its cache is dropped then. The model itself goes with the last reference to
        the engine."""
        with self._pool_cond:
            self._closed = True
            self._created -= len(self._pool)
            self._pool.clear()
            self._pool_cond.notify_all()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _smallest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The smallest ``n`` in [lo, hi] for which ``fits(n)``, given that it holds for every ``n`` above one that
    fits; ``hi`` when none below it does (the caller checks that one)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


class ChatSession:
    """A conversation that keeps its KV cache between turns: a follow-up only prefills the new tokens.

    Its cache is its own, not one of the engine's ``max_sessions`` pooled ones: an app with a session per user
    bounds their number itself. Turns sent from two threads at once run one after the other."""

    def __init__(self, engine: Engine, *, system: str | None = None) -> None:
        self.engine = engine
        self.messages: list[dict[str, str]] = []
        if system is not None:
            # checked now: a bad one would fail every later turn, naming messages[0].content
            if not isinstance(system, str):
                raise InvalidRequestError(f"must be a string, got {type(system).__name__}", field="system")
            _check_text(system, "system")
        if system:
            self.messages.append({"role": "system", "content": system})
        self._cache = engine.new_cache()
        self._lock = threading.Lock()

    def send(self, content: str, *, params: SamplingParams | None = None, cancel: Cancel = None, **sampling: Any) -> GenerationResult:
        """One user turn and the model's answer, both added to ``messages``; sampling and ``cancel`` as in
        :meth:`Engine.generate`. Only the new turn is prefilled."""
        result = None
        for chunk in self.stream(content, params=params, cancel=cancel, **sampling):
            if chunk.result is not None:
                result = chunk.result
        assert result is not None
        return result

    def stream(self, content: str, *, params: SamplingParams | None = None, cancel: Cancel = None, **sampling: Any) -> Iterator[StreamChunk]:
        """One turn, streamed. A turn that is cancelled keeps what it said in the history (as a chat app shows it)."""
        engine = self.engine
        engine._check_open()
        p = engine.sampling_params(params, sampling)
        # normalised (content parts joined): the history holds text, not the caller's own list
        turn = {"role": "user", "content": message_text(content, "content")}
        history = self.messages
        if not isinstance(history, (list, tuple)):  # replaced by the app (None: a bare TypeError at [*history])
            raise InvalidRequestError(f"must be a list of messages, got {type(history).__name__}",
                                      field="session.messages")
        # checked now, so a bad turn fails at the call; encoded again below if an earlier turn ends first
        ids = engine.fit_messages([*history, turn], p)
        is_cancelled = _cancel_check(cancel)

        def run() -> Iterator[StreamChunk]:
            nonlocal ids
            t_start = time.perf_counter()
            # one turn at a time: a turn's stream holds the session until consumed or closed, so the wait can be
            # long; a cancel or the engine's close ends it (the turn never started: it stays out of the history)
            while not self._lock.acquire(timeout=_CANCEL_POLL_S):
                if engine._closed:
                    raise EdgeRuntimeError("engine is closed")
                if is_cancelled():
                    yield StreamChunk("", None, engine._not_started(ids, t_start))
                    return
            said: list[str] = []
            finished = False
            try:
                if engine._closed:
                    raise EdgeRuntimeError("engine is closed")
                messages = [*self.messages, turn]
                if self.messages is not history:  # another turn finished since this one was asked
                    ids = engine.fit_messages(messages, p)
                for chunk in engine.run(self._cache, ids, p, is_cancelled, reuse_decoded=True, started=t_start):
                    if chunk.result is not None:
                        self.messages = [*messages, {"role": "assistant", "content": chunk.result.text}]
                        finished = True
                    said.append(chunk.text)
                    yield chunk
            except GeneratorExit:
                # the caller closed the stream (or dropped it), the engine's own way to stop early: like a cancel,
                # the turn keeps what the caller was shown (the KV cache holds it too)
                if not finished:
                    self.messages = [*messages, {"role": "assistant", "content": "".join(said)}]
                raise
            finally:
                try:
                    self._fit_cache()
                finally:
                    self._lock.release()

        return run()

    def _fit_cache(self) -> None:
        """Give back what the session's cache grew to past twice what its conversation and the engine's
        ``cache_tokens`` need (call with the session's lock held), as the pool does for requests: a long turn, then
        a history started over, kept a cache of the long turn's size for the session's life."""
        engine, cache = self.engine, self._cache
        keep = max(engine._cache_tokens, cache.length)
        if engine._closed or cache.capacity <= 2 * keep:
            return
        try:
            cache.shrink(keep)  # the conversation's tokens all stay: the next turn reuses them
        except MemoryError:  # the smaller buffers could not be had: the session keeps the ones it has
            pass
