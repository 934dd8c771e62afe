"""Runner for llama.cpp through llama-cpp-python (run by ``<cache>/peers/llamacpp-venv``).

``run_llamacpp.py SPEC.json OUT.json``. The model is the original Q4_1 GGUF,
with llama-cpp-python's defaults (memory-mapped weights) except the context,
set to 1024 tokens like this engine's default KV cache. Every request starts
from ``reset()`` (no reused prefix); the prompt pass is ``Llama.eval`` (timed
alone), then the library's own ``generate`` loop samples greedily (temp 0) and
each token is detokenized as an application streaming text would.

Quality: a second ``Llama`` made with ``logits_all=True`` (so the timed one
keeps the library's default, last-position logits only) evaluates the sample
as one sequence; ``scores`` then holds the logits of every position.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import main, next_token_stats

N_CTX = 1024


class LlamaCppRuntime:
    name = "llama-cpp-python"

    def __init__(self) -> None:
        self.prefill_s: float | None = None
        self.extra: dict[str, Any] = {}
        self.llm: Any = None

    def import_runtime(self) -> dict[str, str]:
        import llama_cpp

        self.llama_cpp = llama_cpp
        info = {"llama-cpp-python": llama_cpp.__version__}
        system_info = getattr(llama_cpp, "llama_print_system_info", None)
        if system_info is not None:  # which SIMD kernels the build has (informative)
            info["system_info"] = system_info().decode(errors="replace").strip()
        return info

    def load(self, model: str, threads: int) -> None:
        self.llm = self.llama_cpp.Llama(
            model_path=model, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None

    def generate(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        self.prefill_s = time.perf_counter() - t0
        # tokens=[] and reset=False: sample from the logits of the prompt pass just made
        for produced, token in enumerate(llm.generate([], temp=0.0, reset=False), start=1):
            llm.detokenize([token])
            yield int(token)
            if produced >= max_new_tokens:
                break

    def score(self, model: str, threads: int, ids: list[int], text: str) -> tuple[Sequence[float], Sequence[int], list[int]]:
        llm = self.llama_cpp.Llama(
            model_path=model, n_ctx=max(N_CTX, len(ids)), n_threads=threads, n_threads_batch=threads,
            logits_all=True, verbose=False,
        )
        try:
            llm.eval(ids)
            logprobs, top1 = next_token_stats(llm.scores[: len(ids)], ids)
            own = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)]
        finally:
            llm.close()
        return logprobs, top1, own


if __name__ == "__main__":
    sys.exit(main(LlamaCppRuntime))
