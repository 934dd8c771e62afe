"""The explorer's measurements: every item once on the edge and once through the bridge, cached.

Edge runs (answer, per-token signals, prompt perplexity, energy, latency) come
from :func:`edge_runtime.runs.run_edge`; cloud runs go through a real bridge
over gRPC (:class:`~edge_runtime.cloud.CloudClient`) and record the bridge's
own bill. The confidence estimator is fitted on the dev split's edge runs
(``multi+knn``: every engine signal plus the kNN prior of similar dev
prompts) together with a prompt-only estimate of the cloud's correctness
(the dev items also go through the bridge), so one file gives ``p_correct``
after decoding, a prompt-only score for pre-routing and ``p_cloud`` for
expected-gain routing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..confidence import Estimator, cloud_scores, estimator_scores, fit_estimator, fit_warnings, fitted_features, make_dataset
from ..confidence._fit import Dataset
from ..cost import CostSettings, network_energy_j, reservation_usd, wait_energy_j
from ..policies import ReplayRecords
from ..runs import RUN_SETTINGS, check_cloud_runs, run_cloud, run_edge
from ..tasks import TaskItem

__all__ = ["Measurements", "measure", "cloud_generate"]

log = logging.getLogger("edge_runtime.explore")


@dataclass
class Measurements:
    """Aligned per-item arrays for the explored items, plus what replay needs."""

    items: list[TaskItem]
    edge: list[dict[str, Any]]
    cloud: list[dict[str, Any]]
    estimator: Estimator
    p_correct: np.ndarray
    pre_route_p: np.ndarray
    p_cloud: np.ndarray  # prompt-only estimate of the cloud's correctness (for gain policies)
    records: ReplayRecords
    network_j: np.ndarray  # device energy of escalating each item: the radio (cost model) and the wait (idle watts)
    dev_p_correct: np.ndarray  # calibration traffic for target-rate policies

    @property
    def families(self) -> np.ndarray:
        return np.array([it.family for it in self.items])

    @property
    def local_correct(self) -> np.ndarray:
        return self.records.local_correct

    @property
    def cloud_correct(self) -> np.ndarray:
        return self.records.cloud_correct


def cloud_generate(client: Any, alias: str) -> Any:
    """A :func:`run_cloud` generator that asks the bridge, greedy and short like the edge runs."""
    def generate(item: TaskItem) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = client.generate(list(item.messages), params=RUN_SETTINGS, model=alias or None)
        return {"text": r.text, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "cost_usd": r.cost_usd, "latency_ms": round((time.perf_counter() - t0) * 1000.0, 3),
                "server_ms": r.server_timings.total_ms, "model": r.model, "finish_reason": r.finish_reason}

    return generate


def _rows(items: Sequence[TaskItem], edge: Sequence[dict[str, Any]], cloud: Sequence[dict[str, Any]], p: np.ndarray,
          pre: np.ndarray, p_cloud: np.ndarray, *, reserve: Sequence[float] | None = None,
          reserve_after: Sequence[float] | None = None) -> ReplayRecords:
    local_ms = np.array([e["latency_ms"] for e in edge], float)
    prefill_ms = np.array([min(e["prefill_ms"], e["latency_ms"]) for e in edge], float)
    joules = np.array([e.get("energy_j") or 0.0 for e in edge], float)
    # the meter measured the whole generation; split it between prefill and decode by time
    share = np.divide(prefill_ms, local_ms, out=np.zeros_like(local_ms), where=local_ms > 0)
    return ReplayRecords(
        p_correct=p,
        local_correct=[bool(e["correct"]) for e in edge],
        cloud_correct=[bool(c.get("correct")) for c in cloud],
        cloud_usd=[float(c.get("cost_usd") or 0.0) for c in cloud],
        local_joules=joules,
        local_prefill_joules=joules * share,
        local_ms=local_ms,
        local_prefill_ms=prefill_ms,
        cloud_ms=[float(c.get("latency_ms") or 0.0) for c in cloud],
        token_logprobs=[e["logprobs"] for e in edge],
        token_margins=[e["margins"] for e in edge],
        pre_route_p=pre,
        p_cloud=p_cloud,
        texts=[[str(m.get("content", "")) for m in it.messages] for it in items],
        reserve_usd=reserve,
        reserve_after_usd=reserve_after,
    )


def measure(
    engine: Any,
    generate_cloud: Any,
    cloud_key: str,
    items: Sequence[TaskItem],
    dev_items: Sequence[TaskItem],
    *,
    cost: CostSettings,
    root: Path | None = None,
    cloud_prices: tuple[float, float] | None = None,
    model_hint: str = "*",
    cloud_model: Mapping[str, str] | None = None,
) -> Measurements:
    """Run (or reuse) every needed measurement and assemble the replay records.

    ``cloud_prices``: the bridge's prices now (USD per million input, output tokens);
    cached cloud answers are billed at them, not at the prices of the run that made them.
    ``model_hint``: the cloud model a daemon would name (its ``[cost]`` price), for the
    reservations a live budget makes (see :func:`~edge_runtime.cost.reservation_usd`).
    ``cloud_model``: the bridge's model and revision, recorded with the estimator's cloud prior.
    """
    dev_edge = run_edge(engine, dev_items, root=root, desc="dev items on the edge", energy=True)
    dev = make_dataset(dev_edge, dev_items)
    # as calibrate says them; the explorer's family and split are its own, so only more items help
    for warning in fit_warnings(dev.labels, fitted_features("multi+knn"), remedy="use a suite with more dev items"):
        log.warning("estimator: %s", warning)
    dev_cloud = run_cloud(generate_cloud, cloud_key, dev_items, root=root, desc="dev items through the bridge")
    check_cloud_runs(dev_cloud)
    by_id = {c["item_id"]: bool(c.get("correct")) for c in dev_cloud}
    cloud_labels = np.array([by_id[r["item_id"]] for r in dev.records], dtype=float)
    estimator = fit_estimator("multi+knn", dev, bundle_hash=engine.bundle_hash, cloud_labels=cloud_labels)
    if cloud_model is not None and isinstance(estimator.meta, dict):
        estimator.meta["cloud_model"] = dict(cloud_model)
    edge = run_edge(engine, items, root=root, desc="test items on the edge", energy=True)
    cloud = run_cloud(generate_cloud, cloud_key, items, root=root, desc="test items through the bridge")
    check_cloud_runs(cloud)
    if cloud_prices is not None:
        pin, pout = cloud_prices
        cloud = [{**c, "cost_usd": (c["prompt_tokens"] * pin + c["completion_tokens"] * pout) / 1e6}
                 if "prompt_tokens" in c else c for c in cloud]
    data: Dataset = make_dataset(edge, items)
    p = estimator_scores(estimator, data)
    assert estimator.cloud is not None
    p_cloud = cloud_scores(estimator.cloud, data)
    knn = getattr(estimator, "knn")
    pre = np.array([knn.prior_from_embedding(e) for e in data.embeddings(knn.encoder)])
    dev_p = estimator_scores(estimator, dev, training_data=True)
    net_j = np.array([
        network_energy_j(cost, 256 + sum(len(str(m.get("content", "")).encode()) for m in it.messages) + len(e["text"].encode()),
                         128 + len(str(c.get("text", "")).encode()))
        for it, e, c in zip(items, edge, cloud)
    ])
    # the device's idle draw while it waits for the cloud, as a live escalation counts it
    meter = getattr(engine, "energy_meter", None)
    net_j += np.array([wait_energy_j(meter, float(c.get("latency_ms") or 0.0)) for c in cloud])
    # what a live budget reserves for each escalation: before decoding, and after it with the answer as the draft
    reserve = [reservation_usd(cost, model_hint, cloud_prices, it.messages, RUN_SETTINGS.max_new_tokens) for it in items]
    reserve_after = [reservation_usd(cost, model_hint, cloud_prices, it.messages, RUN_SETTINGS.max_new_tokens,
                                     draft=e["text"]) for it, e in zip(items, edge)]
    rows = _rows(items, edge, cloud, p, pre, p_cloud, reserve=reserve, reserve_after=reserve_after)
    return Measurements(items=list(items), edge=list(edge), cloud=list(cloud), estimator=estimator, p_correct=p, pre_route_p=pre,
                        p_cloud=p_cloud, records=rows, network_j=net_j, dev_p_correct=dev_p)


