"""Fitting estimators on labelled runs (the dev split) and studying them side by side.

Inputs are cached run records (``edge_runtime.runs``) joined with their task
items; labels are the scorer's verdicts. Every family in
:mod:`._estimators` can be fitted here; :func:`score_estimators` applies the
fitted ones to held-out records so ``edge-runtime eval --study`` can report
AUROC, calibration error and routing metrics per family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..tasks import TaskItem
from ._estimators import (
    CLOUD_PROMPT_FEATURES,
    FEATURE_SETS,
    CloudPrior,
    Estimator,
    HeuristicEstimator,
    KnnEstimator,
    KnnPrior,
    LogisticEstimator,
    SelfCheckEstimator,
)
from ._features import FEATURES, Signals, feature_vector, no_answer, signals_from_record
from ._logistic import fit_logistic

__all__ = [
    "Dataset", "make_dataset", "check_family", "fit_estimator", "fit_cloud_prior", "cloud_scores", "FAMILIES", "SINGLE_SIGNALS", "estimator_scores",
]

# the single-signal baselines reported next to the fitted families
SINGLE_SIGNALS = ("lp_mean", "lp_min", "margin_min", "first_lp", "ent_mean", "ans_lp_mean", "prompt_nll")
# families `fit_estimator` knows, in the order the study reports them
FAMILIES = ("heuristic", "generic", "multi", "span", "selfcheck", "knn", "prompt", "multi+knn")


class Dataset:
    """Feature rows, labels and prompts of labelled runs, with sentence embeddings computed on demand."""

    def __init__(self, signals: list[Signals], labels: np.ndarray, records: list[Mapping[str, Any]]) -> None:
        self.signals = signals
        self.labels = labels
        self.records = records
        self.features = [feature_vector(s) for s in signals]
        self._embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.signals)

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        return np.array([[f[n] for n in names] for f in self.features], dtype=float)

    def embeddings(self, encoder: Any) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = encoder.encode([s.prompt for s in self.signals])
        return self._embeddings


def make_dataset(records: Sequence[Mapping[str, Any]], items: Sequence[TaskItem]) -> Dataset:
    by_id = {it.id: it for it in items}
    signals, labels, kept = [], [], []
    for rec in records:
        item = by_id.get(rec["item_id"])
        if item is None or "logprobs" not in rec:
            continue
        signals.append(signals_from_record(rec, item.prompt))
        labels.append(1.0 if rec["correct"] else 0.0)
        kept.append(rec)
    return Dataset(signals, np.array(labels), kept)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _knn_loo(data: Dataset, encoder: Any, k: int) -> tuple[KnnPrior, np.ndarray]:
    """The kNN prior over the dev prompts and its leave-one-out value for each of them (no label leaks into its own row)."""
    if encoder is None:
        from ._embed import shared_encoder

        encoder = shared_encoder()
    emb = data.embeddings(encoder)
    knn = KnnPrior(emb, data.labels, k, encoder=encoder)
    return knn, np.array([knn.prior_from_embedding(emb[i], exclude=i) for i in range(len(data))])


def fit_cloud_prior(data: Dataset, cloud_labels: np.ndarray, *, encoder: Any = None, k: int = 15, l2: float = 1.0) -> CloudPrior:
    """P(cloud correct | prompt) from the dev prompts labelled with the cloud's correctness."""
    if len(cloud_labels) != len(data):
        raise ValueError(f"{len(cloud_labels)} cloud labels for {len(data)} items")
    cloud_data = Dataset(data.signals, np.asarray(cloud_labels, float), data.records)
    cloud_data._embeddings = data._embeddings
    knn, loo = _knn_loo(cloud_data, encoder, k)
    data._embeddings = cloud_data._embeddings  # share the embeddings computed for it
    names = (*CLOUD_PROMPT_FEATURES, "cloud_knn")
    x = np.hstack([data.matrix(CLOUD_PROMPT_FEATURES), loo[:, None]])
    return CloudPrior(fit_logistic(x, cloud_data.labels, names, l2=l2), knn)


def cloud_scores(prior: CloudPrior, data: Dataset) -> np.ndarray:
    """p_cloud of every row of a dataset (prompt only)."""
    emb = data.embeddings(prior.knn.encoder)
    return np.array([prior.p_cloud(s.prompt, s.prompt_tokens, knn_prior=prior.knn.prior_from_embedding(e))
                     for s, e in zip(data.signals, emb)])


def check_family(family: str) -> None:
    """InvalidRequestError naming ``family`` unless it is a known family or ``signal:<feature>`` of a known feature."""
    if family in FAMILIES:
        return
    if family.startswith("signal:"):
        if family.split(":", 1)[1] in FEATURES:
            return
        raise InvalidRequestError(f"unknown feature in {family!r} (known: {', '.join(FEATURES)})", field="family")
    raise InvalidRequestError(f"unknown estimator family {family!r} (known: {', '.join(FAMILIES)}, signal:<feature>)", field="family")


def fit_estimator(family: str, data: Dataset, *, bundle_hash: str | None, encoder: Any = None, k: int = 15,
                  l2: float = 1.0, cloud_labels: np.ndarray | None = None) -> Estimator:
    """Fit one family on a labelled dataset (usually the dev split); with ``cloud_labels`` also a cloud prior."""
    check_family(family)
    if not len(data):
        raise InvalidRequestError("there are no items to fit on", field="split")
    est = _fit_family(family, data, bundle_hash=bundle_hash, encoder=encoder, k=k, l2=l2)
    if cloud_labels is not None:
        knn_encoder = encoder or getattr(getattr(est, "knn", None), "encoder", None)
        est.cloud = fit_cloud_prior(data, cloud_labels, encoder=knn_encoder, k=k, l2=l2)
    return est


def _fit_family(family: str, data: Dataset, *, bundle_hash: str | None, encoder: Any, k: int, l2: float) -> Estimator:
    meta = {"trained_on_items": len(data), "trained_accuracy": round(float(data.labels.mean()), 4), "family": family}
    if family == "heuristic":
        return HeuristicEstimator()
    if family.startswith("signal:"):
        name = family.split(":", 1)[1]
        model = fit_logistic(data.matrix([name]), data.labels, (name,), l2=l2)
        return LogisticEstimator(family, model, bundle_hash=bundle_hash, meta=meta)
    if family in FEATURE_SETS:
        names = FEATURE_SETS[family]
        return LogisticEstimator(family, fit_logistic(data.matrix(names), data.labels, names, l2=l2), bundle_hash=bundle_hash, meta=meta)
    if family == "knn":
        knn, _ = _knn_loo(data, encoder, k)
        return KnnEstimator(knn, bundle_hash=bundle_hash, meta=meta)
    if family == "multi+knn":
        knn, loo = _knn_loo(data, encoder, k)
        names = (*FEATURE_SETS["multi"], "knn_prior")
        x = np.hstack([data.matrix(FEATURE_SETS["multi"]), loo[:, None]])
        return LogisticEstimator(family, fit_logistic(x, data.labels, names, l2=l2), knn=knn, bundle_hash=bundle_hash, meta=meta)
    if family == "selfcheck":
        p_yes = np.array([float(r.get("selfcheck_p_yes", math.nan)) for r in data.records])
        if np.isnan(p_yes).any():
            raise ValueError("selfcheck needs records with selfcheck_p_yes (run with selfcheck=True)")
        model = fit_logistic(_logit(p_yes)[:, None], data.labels, ("logit_p_yes",), l2=l2)
        # fold standardisation into one slope and intercept on logit P(yes)
        a = float(model.coef[0] / model.std[0])
        b = float(model.intercept - a * model.mean[0])
        return SelfCheckEstimator(a, b, bundle_hash=bundle_hash, meta=meta)
    raise AssertionError(f"check_family let {family!r} through")


def estimator_scores(estimator: Estimator, data: Dataset, *, training_data: bool = False) -> np.ndarray:
    """p_correct of an estimator on every row of a dataset, from cached records alone (no model run).

    ``training_data``: ``data`` is what the estimator was fitted on, row for row. A kNN
    prior then leaves each row's own label out, as in fitting; with it, every row
    would find itself among its neighbours and the in-sample figures would be an
    artefact (AUROC 1.0 for ``knn``, or 0.0 for ``multi+knn``, whose fit saw the
    leave-one-out prior).

    A reply with no text scores 0, as the hybrid runtime scores it (:func:`no_answer`): the explorer's replay gave
    it the estimator's ~0.9 and predicted it kept local, where the daemon escalates it.
    """
    scores = _scores(estimator, data, training_data)
    scores[[no_answer(s.text) for s in data.signals]] = 0.0
    return scores


def _scores(estimator: Estimator, data: Dataset, training_data: bool) -> np.ndarray:
    def priors(knn: Any) -> list[float]:
        emb = data.embeddings(knn.encoder)
        return [knn.prior_from_embedding(e, exclude=i if training_data else None) for i, e in enumerate(emb)]

    if isinstance(estimator, SelfCheckEstimator):
        return np.array([estimator.from_p_yes(float(r["selfcheck_p_yes"])) for r in data.records])
    if isinstance(estimator, KnnEstimator):
        return np.array(priors(estimator.knn))
    if isinstance(estimator, LogisticEstimator) and estimator.knn is not None:
        return np.array([estimator.p_correct(s, knn_prior=p) for s, p in zip(data.signals, priors(estimator.knn))])
    return np.array([estimator.p_correct(s) for s in data.signals])
