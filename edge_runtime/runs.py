"""Run task items through a model once and cache what happened, item by item.

Calibration, evaluation and the design-space explorer all need the same thing:
every item answered once on the edge (text, per-token signals, prompt
perplexity, latency, energy, correctness) and once on the cloud side (text,
tokens, cost, latency, correctness). Runs are appended to a JSON-lines file
keyed by the model's identity and the generation settings, so a second run
costs nothing and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ._files import naming
from .cache import cache_dir
from .confidence._selfcheck import selfcheck_messages, yes_probability
from .engine.types import SamplingParams
from .errors import CloudError, EdgeRuntimeError, InvalidRequestError
from .tasks import TaskItem, score

__all__ = [
    "RUN_SETTINGS", "RunCache", "engine_key", "run_edge", "run_cloud", "edge_record", "prompt_key", "progress_bar", "local_cloud_generate",
]

log = logging.getLogger(__name__)

# generation settings of suite runs: greedy and short, as an app asking for a short answer would
RUN_SETTINGS = SamplingParams(max_new_tokens=64, temperature=0.0)

def progress_bar(iterable: Iterable[Any], *, total: int | None = None, desc: str = "") -> Iterable[Any]:
    """A tqdm bar on a terminal; plain iteration elsewhere (logs, CI)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


class RunCache:
    """Append-only JSON lines of records keyed by item id and prompt, for one (model, settings) pair.

    Keyed by the prompt too: two suites whose ids coincide (``q0``, ``q1``, ...) each find their own answers, where
    one record per id made each run of one suite answer the other's items again (QA QQ)."""

    def __init__(self, kind: str, model_key: str, settings: SamplingParams, root: Path | None = None) -> None:
        settings_key = hashlib.sha256(json.dumps(_settings_dict(settings), sort_keys=True).encode()).hexdigest()[:12]
        base = root if root is not None else cache_dir("runs")
        base.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
        if safe != model_key or len(safe) > 80:
            # the whole key's hash keeps apart keys that share their first 80 characters (a long bundle name, then
            # its hash or the bridge's revision), and keys that differ only where a character was replaced: a
            # bridge's "acme/llm-7b" and "acme:llm-7b" shared one file, and the second model was never asked
            safe = f"{safe[:80]}-{hashlib.sha256(model_key.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
        self.path = base / f"{kind}-{safe}-{settings_key}.jsonl"
        self.records: dict[tuple[str, str | None], dict[str, Any]] = {}
        # an interrupted write can leave a last line without its newline: start the next record on a fresh line
        self._needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                self._needs_newline = fh.read(1) != b"\n"
        if self.path.exists():
            with self.path.open("rb") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        # a line cut short by an interruption (inside a character, too) or edited by hand: that
                        # item simply runs again (it was a traceback at every later run)
                        continue
                    if _well_formed(rec):
                        self.remember(rec)

    def get(self, item: TaskItem) -> dict[str, Any] | None:
        """The last record of ``item`` as it is now (records written before prompts were recorded never match)."""
        return self.records.get((item.id, prompt_key(item)))

    def __getitem__(self, item: TaskItem) -> dict[str, Any]:
        return self.records[(item.id, prompt_key(item))]

    def remember(self, record: dict[str, Any]) -> None:
        """Hold ``record`` for this run only (a failed call, tried again next time)."""
        self.records[(record["item_id"], record.get("prompt_key"))] = record

    def add(self, record: dict[str, Any]) -> None:
        self.remember(record)
        with naming(self.path), self.path.open("a", encoding="utf-8") as fh:
            fh.write(("\n" if self._needs_newline else "") + json.dumps(record, ensure_ascii=False) + "\n")
        self._needs_newline = False


def _well_formed(rec: Any) -> bool:
    """A record this module wrote: its key and answer of the types it wrote them."""
    return (isinstance(rec, dict) and isinstance(rec.get("item_id"), str)
            and isinstance(rec.get("prompt_key"), (str, type(None))) and isinstance(rec.get("text", ""), str))


def _settings_dict(p: SamplingParams) -> dict[str, Any]:
    return {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "seed": p.seed, "stop": list(p.stop)}


def prompt_key(item: TaskItem) -> str:
    """What a generation depends on besides the model and the settings: the item's messages.

    Records carry it, so an item id that now names another question (a JSON-lines
    suite edited, or another suite reusing ids) runs again instead of bringing back
    the old answer. Records written before it existed have none and run again too.
    """
    return hashlib.sha256(json.dumps(list(item.messages), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def prompt_keys(items: Sequence[TaskItem]) -> list[str]:
    """The items' :func:`prompt_key`s, sorted, once each: what an estimator records of the items it was fitted on,
    so that ``eval`` knows in-sample scoring by the questions themselves (a suite's name says nothing of the items
    it shares with another: ``arithmetic`` is part of ``default``, and ``./a.jsonl`` is ``a.jsonl``)."""
    return sorted({prompt_key(item) for item in items})


def _rescored(item: TaskItem, rec: dict[str, Any]) -> dict[str, Any]:
    """``rec`` scored against the item as it is now: a corrected answer key applies without a new run."""
    rec = {**rec, "family": item.family, "split": item.split}  # as they are now too: a suite file may have moved it
    if "text" not in rec:  # a failed cloud call: nothing to score
        return rec
    s = score(item, rec["text"])
    return {**rec, "correct": s.correct, "extracted": s.extracted, "parse_error": s.parse_error}


def edge_record(item: TaskItem, result: Any, wall_ms: float) -> dict[str, Any]:
    """The cached form of one edge generation: everything estimators and the explorer replay from."""
    s = score(item, result.text)
    energy = result.energy
    return {
        "item_id": item.id,
        "prompt_key": prompt_key(item),
        "family": item.family,
        "split": item.split,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "token_ids": result.token_ids,
        "token_texts": [t.text for t in result.tokens],
        "logprobs": [round(t.logprob, 5) for t in result.tokens],
        "entropies": [round(t.entropy, 5) for t in result.tokens],
        "margins": [round(t.margin, 5) for t in result.tokens],
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "prompt_nll": result.prompt_nll,
        "prefill_ms": round(result.timings.prefill_ms, 3),
        "decode_ms": round(result.timings.decode_ms, 3),
        "ttft_ms": round(result.timings.ttft_ms, 3),
        "latency_ms": round(wall_ms, 3),
        "energy_j": energy.joules if energy else None,
        "process_energy_j": energy.process_joules if energy else None,
        "energy_source": energy.source if energy else None,
        "energy_estimated": energy.estimated if energy else None,
        "correct": s.correct,
        "extracted": s.extracted,
        "parse_error": s.parse_error,
    }


def run_edge(
    engine: Any,
    items: Sequence[TaskItem],
    *,
    settings: SamplingParams = RUN_SETTINGS,
    root: Path | None = None,
    selfcheck: bool = False,
    desc: str = "edge",
    on_record: Callable[[dict[str, Any]], None] | None = None,
    energy: bool = False,
) -> list[dict[str, Any]]:
    """Answer every item on the edge engine (cached by bundle hash, item id and prompt); return records in item order.

    ``energy``: the records' energy figures matter (the explorer's), so a cached one
    measured by another meter (another source or device profile) is run again.
    """
    cache = RunCache("edge", engine_key(engine), settings, root)
    # every new record names its meter, also when this caller ignores energy (calibrate, eval): the explorer,
    # which does not, must be able to tell an estimate from a measurement when it finds the record later
    engine_meter = getattr(engine, "energy_meter", None)
    meter = engine_meter if energy else None

    def measured_alike(rec: dict[str, Any]) -> bool:
        if meter is None:
            return True
        if "energy_meter" in rec:
            return bool(rec["energy_meter"] == meter.identity)
        # a record without its meter (an older release's): by its label. An estimate is alike only to a meter
        # that estimates: a meter with a counter must measure it again
        return rec.get("energy_source") == meter.source

    def fresh(item: TaskItem) -> dict[str, Any] | None:
        rec = cache.get(item)
        return rec if rec is None or measured_alike(rec) else None

    todo = [it for it in items if (rec := fresh(it)) is None or (selfcheck and "selfcheck_p_yes" not in rec)]
    for item in progress_bar(todo, total=len(todo), desc=desc):
        rec = fresh(item)
        if rec is None:
            t0 = time.perf_counter()
            try:
                result = engine.generate(messages=list(item.messages), params=settings, prompt_nll=True)
            except InvalidRequestError as err:  # a suite's item the model cannot take: say which one
                raise type(err)(f"suite item {item.id!r}: {err}") from err
            rec = edge_record(item, result, (time.perf_counter() - t0) * 1000.0)
            if engine_meter is not None:
                rec["energy_meter"] = engine_meter.identity
        if selfcheck:
            p_yes = yes_probability(engine, selfcheck_messages(item.messages, rec["text"]))
            rec = {**rec, "selfcheck_p_yes": round(p_yes, 6)}
        cache.add(rec)
        if on_record is not None:
            on_record(rec)
    return [_rescored(it, cache[it]) for it in items]


def engine_key(engine: Any) -> str:
    """A run cache's name for an engine's answers: its bundle, the onnxruntime that computes them, and its decoding
    where that changes them.

    onnxruntime's quantized kernels change between its versions (1.23-1.26 computed the 4-bit embedding lookup
    wrongly): answers cached under another version are not this one's. Drafted steps run several rows at once,
    which the int4/int8 kernels compute a little differently from one row: answers may differ at near-ties, so they
    are kept apart too. Not in the key: the CPU (a cache copied to a machine with other instructions is read).
    """
    key = f"{engine.model_name}-{engine.bundle_hash[:16]}"
    if version := getattr(engine, "onnxruntime_version", ""):
        key += f"-ort{version}"
    return f"{key}-lookup{engine.prompt_lookup}" if engine.prompt_lookup else key


def run_cloud(
    generate: Callable[[TaskItem], dict[str, Any]],
    model_key: str,
    items: Sequence[TaskItem],
    *,
    settings: SamplingParams = RUN_SETTINGS,
    root: Path | None = None,
    desc: str = "cloud",
) -> list[dict[str, Any]]:
    """Answer every item through ``generate`` (a bridge call or a local engine), cached by model key and item id.

    ``generate(item)`` returns ``text``, ``prompt_tokens``, ``completion_tokens``,
    ``cost_usd``, ``latency_ms`` and ``model``. A cloud failure is recorded as such
    (``error``) and retried on the next run rather than cached as an answer.
    """
    cache = RunCache("cloud", model_key, settings, root)
    todo = [it for it in items if (rec := cache.get(it)) is None or rec.get("error")]
    for item in progress_bar(todo, total=len(todo), desc=desc):
        try:
            out = generate(item)
        except (CloudError, EdgeRuntimeError) as err:
            log.warning("cloud run of %s failed: %s", item.id, err)
            cache.remember({"item_id": item.id, "prompt_key": prompt_key(item), "error": str(err)})
            continue
        s = score(item, out["text"])
        cache.add({"item_id": item.id, "prompt_key": prompt_key(item), "family": item.family, "split": item.split, **out,
                   "correct": s.correct, "extracted": s.extracted, "parse_error": s.parse_error})
    return [_rescored(it, cache[it]) for it in items]


def check_cloud_runs(records: Sequence[dict[str, Any]]) -> None:
    """Refuse cloud records with failed runs (``run_cloud`` keeps them for this run only): read as wrong answers,
    they lowered the cloud's accuracy and the labels a cloud prior is fitted on."""
    failed = [c for c in records if c.get("error")]
    if failed:
        raise CloudError(f"{len(failed)} cloud runs failed (first: {failed[0]['item_id']}: {failed[0]['error']}); "
                         "run again to retry them")


def local_cloud_generate(engine: Any, settings: SamplingParams = RUN_SETTINGS) -> Callable[[TaskItem], dict[str, Any]]:
    """A ``run_cloud`` generator that runs the cloud stand-in bundle in-process (no bridge, no price)."""
    def generate(item: TaskItem) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = engine.generate(messages=list(item.messages), params=settings)
        return {"text": r.text, "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                "cost_usd": 0.0, "latency_ms": round((time.perf_counter() - t0) * 1000.0, 3), "model": engine.model_name,
                "finish_reason": r.finish_reason}

    return generate

