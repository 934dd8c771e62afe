"""Runner for onnxruntime-genai (run by ``<cache>/peers/genai-venv``): ``run_genai.py SPEC.json OUT.json``.

The model directory is what ``python -m onnxruntime_genai.models.builder -p int4
-e cpu`` wrote. The thread count is set through a config overlay (the same
intra-op setting this engine uses); ``max_length`` is the prompt plus the new
tokens, as an application would set it, so the shared past/present KV buffer is
sized like ours rather than for the full 8k context. ``min_length`` keeps a
greedy run from stopping at an end-of-sequence token before the requested count.
Each generated token is streamed through the tokenizer stream, as an
application showing text would.

Quality: the whole sample goes in as one prompt (``append_tokens``) and the
decoder's ``logits`` output holds every position (shape [1, n, vocab] in
0.18). The ids are fed directly: they come from the GGUF's tokenizer, and
genai's own tokenizer is only compared with them (recorded, informative).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import main, next_token_stats


class GenaiRuntime:
    name = "onnxruntime-genai"

    def __init__(self) -> None:
        self.prefill_s: float | None = None
        self.extra: dict[str, Any] = {}
        self.model: Any = None
        self.tokenizer: Any = None

    def import_runtime(self) -> dict[str, str]:
        import onnxruntime
        import onnxruntime_genai as og

        self.og = og
        return {"onnxruntime-genai": og.__version__, "onnxruntime": onnxruntime.__version__}

    def load(self, model: str, threads: int) -> None:
        og = self.og
        config = og.Config(model)
        config.clear_providers()  # CPU
        session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)

    def unload(self) -> None:
        self.model = self.tokenizer = None

    def generate(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + max_new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        generator = og.Generator(self.model, params)
        stream = self.tokenizer.create_stream()
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        self.prefill_s = time.perf_counter() - t0
        produced = 0
        while produced < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            stream.decode(token)
            produced += 1
            yield token
        del generator

    def score(self, model: str, threads: int, ids: list[int], text: str) -> tuple[Sequence[float], Sequence[int], list[int]]:
        og = self.og
        self.load(model, threads)
        try:
            params = og.GeneratorParams(self.model)
            params.set_search_options(do_sample=False, max_length=len(ids) + 1, batch_size=1)
            generator = og.Generator(self.model, params)
            generator.append_tokens(ids)
            logits = generator.get_output("logits")
            if logits.shape[:2] != (1, len(ids)):
                raise RuntimeError(f"genai's logits output has shape {logits.shape}, not one row per position "
                                   f"of the {len(ids)} prompt tokens")
            logprobs, top1 = next_token_stats(logits[0], ids)
            own = [int(t) for t in self.tokenizer.encode(text)]
            del generator
        finally:
            self.unload()
        return logprobs, top1, own


if __name__ == "__main__":
    sys.exit(main(GenaiRuntime))
