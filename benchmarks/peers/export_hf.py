"""Write a Hugging Face model directory (safetensors, fp32) from a GGUF file, with transformers.

onnxruntime-genai's model builder reads a Hugging Face directory, or a GGUF
file only when its tensors are float: a Q4_1 GGUF must be dequantized first.
Run with the project's own environment (the ``export`` extra has transformers
and gguf):

    python benchmarks/peers/export_hf.py GGUF_FILE OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_hf(gguf_file: Path, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    # write to a sibling and rename, so an interrupted export never looks finished
    partial = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.out_dir.exists():
        print(f"{args.out_dir} exists", file=sys.stderr)
        return 1
    export_hf(args.gguf_file.resolve(), args.out_dir)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
