"""Runner for this project's engine (run by the project's own Python): ``run_engine.py SPEC.json OUT.json``.

Generation goes through ``Engine.run`` on one KV cache that is emptied before
every request: the same loop ``Engine.generate`` runs (sampling, per-token
logprob/entropy/margin, incremental detokenization, stop matching, the
engine's own energy window), without the pool's prefix reuse, which would
otherwise turn every repetition after the first into a one-token prefill.
Quality is ``Engine.score`` (chunked prefill of the whole sample on one KV
cache, keeping the logits of every position).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))

from _harness import main


class EngineRuntime:
    name = "edge-runtime"

    def __init__(self) -> None:
        self.prefill_s: float | None = None
        self.extra: dict[str, Any] = {}
        self.options: dict[str, Any] = {}  # Engine keyword arguments (the target's options)
        self.engine: Any = None
        self.cache: Any = None

    def import_runtime(self) -> dict[str, str]:
        import numpy
        import onnxruntime
        import tokenizers

        import edge_runtime
        import edge_runtime.engine

        return {
            "edge-runtime": edge_runtime.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__,
        }

    def load(self, model: str, threads: int) -> None:
        from edge_runtime.engine import Engine

        self.engine = Engine(model, intra_op_threads=threads, **self.options)
        self.cache = self.engine.new_cache()
        self.load_info = {"engine_load_ms": self.engine.load_ms, "precision": self.engine.precision,
                          "prompt_lookup": self.engine.prompt_lookup}

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = self.cache = None

    def generate(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        from edge_runtime.engine import SamplingParams

        self.cache.truncate(0)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        for chunk in self.engine.run(self.cache, ids, params, lambda: False):
            if chunk.token is not None:
                yield chunk.token.id
            if chunk.result is not None:
                result = chunk.result
                t = result.timings
                self.prefill_s = t.prefill_ms / 1000.0
                self.extra = {
                    "engine_timings_ms": {"prefill": t.prefill_ms, "decode": t.decode_ms, "ttft": t.ttft_ms},
                    "engine_decode_tokens_per_s": result.decode_tokens_per_s,
                    "finish_reason": result.finish_reason,
                    "draft_tokens": result.usage.draft_tokens,
                    "accepted_draft_tokens": result.usage.accepted_draft_tokens,
                    "engine_energy": None if result.energy is None else {
                        "joules": result.energy.joules, "process_joules": result.energy.process_joules,
                        "source": result.energy.source, "estimated": result.energy.estimated,
                    },
                }

    def score(self, model: str, threads: int, ids: list[int], text: str) -> tuple[Sequence[float], Sequence[int], list[int]]:
        from edge_runtime.engine import Engine

        engine = Engine(model, intra_op_threads=threads, energy_meter=None, cache_tokens=max(1024, len(ids)))
        try:
            scored = engine.score(token_ids=ids)
            own = engine.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            engine.close()
        return scored.logprobs.tolist(), scored.top1.tolist(), own


if __name__ == "__main__":
    sys.exit(main(EngineRuntime))
