"""How far a rate measured on a few items can be trusted, and the fits a few items cannot support.

A team's first task suite has 10 to 40 items. On 14 items the explorer picked the best of 131 policies and called
its goal met (71.4% against the cloud's 71.4%); on the rest of the suite the same policy reached 0.85 of the
cloud. A logistic fit with 29 features on 18 items separated them exactly (in-sample AUROC 1.000) and then
gave wrong answers p_correct 0.99. The tools say so now instead of printing such figures as the 578-item
study's.
"""

from __future__ import annotations

import math

import numpy as np

from ._estimators import FEATURE_SETS

__all__ = ["FEW_ITEMS", "FEW_FAMILY_ITEMS", "fitted_features", "fit_warnings", "half_width_95", "wilson_interval"]

FEW_ITEMS = 50  # below this, a rate's 95% interval is wider than ±14 points
FEW_FAMILY_ITEMS = 10  # a family this small is shown, not judged
ITEMS_PER_FEATURE = 5  # a logistic fit with fewer items per feature separates its training items by chance


def wilson_interval(rate: float, n: int) -> tuple[float, float]:
    """The 95% Wilson interval of a proportion measured on ``n`` items (sensible at 0, 1 and small n)."""
    if n <= 0 or rate != rate:
        return math.nan, math.nan
    z = 1.96
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def half_width_95(n: int) -> float:
    """The widest half-interval of a rate on ``n`` items (at 50%), in the normal approximation."""
    return 1.96 * math.sqrt(0.25 / max(n, 1))


def fitted_features(family: str) -> int | None:
    """How many weights an estimator family's logistic fit learns (None: it fits none per feature)."""
    base, _, extra = family.partition("+")
    if base in FEATURE_SETS:
        n = len(FEATURE_SETS[base])
    elif base in ("heuristic", "knn"):
        return None
    else:
        n = 1  # a single signal, or the self-check's yes-probability
    return n + (1 if extra == "knn" else 0)  # "+knn": the kNN prior is one more input


def fit_warnings(labels: np.ndarray, n_features: int | None, *,
                 remedy: str = "use more items, or a family with fewer features (generic: 6)") -> list[str]:
    """Why an estimator fitted on these labels would say little: one class only, or too few of the rarer class per
    feature (it is the wrong answers, or the right ones, the fit has to tell apart: 150 items with 8 wrong answers
    fitted noise to an in-sample AUROC of 0.97). ``remedy``: what the caller can change."""
    labels = np.asarray(labels)
    n = len(labels)
    right = int(np.count_nonzero(labels))
    if n and right in (0, n):
        return [f"all {n} items are {'right' if right else 'wrong'}: the estimator cannot learn to tell right "
                f"from wrong answers on them ({remedy.split(',')[0]})"]
    rarer = min(right, n - right)
    if n_features and rarer < ITEMS_PER_FEATURE * n_features:
        kind = "wrong" if rarer == n - right else "right"
        return [f"{rarer} {kind} answers among {n} items for {n_features} features: the fit can separate them by "
                f"chance, so its in-sample figures say nothing about new traffic and its p_correct may be near 0 or "
                f"1 when wrong; it needs some {ITEMS_PER_FEATURE * n_features} of each ({remedy})"]
    return []
