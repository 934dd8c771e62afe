"""Tiny random causal LMs built from transformers configs, saved as Hugging Face directories.

A byte-level BPE tokenizer trained on a few lines of ASCII text means any
non-ASCII character is split over several tokens, which is what the UTF-8
streaming tests need. Weights are random (seeded) with a large initializer
range so that greedy argmax is far from ties.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? paris is the capital of france.",
    "answer with just the number: 12 + 7 = 19",
    "hello world, this is a tiny model for tests.",
    "one two three four five six seven eight nine ten",
] * 20


def make_tokenizer(directory: Path, kind: str = "byte_level"):
    """``byte_level`` (GPT-2's, as SmolLM2 and Qwen have), ``metaspace_first``: SentencePiece-style, "▁" before
    the text's first split only, as transformers converts Llama/Mistral tokenizers with ``legacy=False``, or
    ``byte_fallback``: Llama 2's and Mistral's as transformers converts them (legacy), whose 256 byte tokens
    "<0xE3>" are plain pieces, each decoded as its byte (an incomplete character as one U+FFFD per byte)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if kind == "byte_fallback":
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        spec["decoder"] = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
        tok = Tokenizer.from_str(json.dumps(spec))  # (trained above: the byte tokens are added after training)
        trainer = None
    elif kind == "metaspace_first":
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        fallback = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[*specials, *fallback])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if trainer is not None:
        tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def make_tiny_model(directory: Path, arch: str = "llama", *, seed: int = 0, layers: int = 2, tie: bool = True,
                    tokenizer: str = "byte_level") -> Path:
    """Save a tiny random ``arch`` model (llama or qwen2) with its tokenizer (see :func:`make_tokenizer`) into
    ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, tokenizer)
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=tie,
    )
    if arch == "llama":
        config = LlamaConfig(rope_theta=10000.0, **common)
    elif arch == "qwen2":
        config = Qwen2Config(rope_theta=1000000.0, use_sliding_window=False, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if arch == "qwen2":  # qwen2 has q/k/v biases: make them non-trivial
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(directory)
    return directory


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids``: the reference the engine must equal token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False)
    return out[0][len(ids):].tolist()
