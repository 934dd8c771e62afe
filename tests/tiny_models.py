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
                    tokenizer: str = "byte_level", kv_heads: int = 2) -> Path:
    """Save a tiny random ``arch`` model (llama or qwen2) with its tokenizer (see :func:`make_tokenizer`) into
    ``directory``; 4 attention heads, ``kv_heads`` KV heads."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory, tokenizer)
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
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


def llama_cpp_permute(weights, n_head: int, n_head_kv: int):
    """Q/K rows in the order llama.cpp's convert_hf_to_gguf.py writes them for llama (its ``LlamaModel.permute``)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def make_tiny_gguf(model_dir: Path, path: Path, *, head_count_kv: bool = True) -> Path:
    """Write a tiny llama made by :func:`make_tiny_model` (byte-level tokenizer) as llama.cpp's converter writes it:
    F32 tensors under GGUF names, Q and K permuted, a gpt2 tokenizer; ``head_count_kv=False`` leaves out the
    optional ``llama.attention.head_count_kv`` key (llama.cpp then takes as many KV heads as heads)."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    if head_count_kv:
        w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    tokens = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    specials = {t["content"] for t in spec["added_tokens"]}
    ordered = sorted(tokens, key=tokens.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(ordered)
    w.add_token_types([3 if t in specials else 1 for t in ordered])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def add(name: str, key: str, permute: int | None = None) -> None:
        data = weights[key].astype(np.float32)
        w.add_tensor(name, llama_cpp_permute(data, heads, permute) if permute else data)

    add("token_embd.weight", "model.embed_tokens.weight")
    add("output_norm.weight", "model.norm.weight")
    for i in range(cfg["num_hidden_layers"]):
        hf = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", hf + "input_layernorm.weight")
        add(f"blk.{i}.attn_q.weight", hf + "self_attn.q_proj.weight", permute=heads)
        add(f"blk.{i}.attn_k.weight", hf + "self_attn.k_proj.weight", permute=kv_heads)
        for gguf_name, hf_name in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                   ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"),
                                   ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            add(f"blk.{i}.{gguf_name}.weight", f"{hf}{hf_name}.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
