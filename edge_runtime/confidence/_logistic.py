"""L2-regularised logistic regression: fitted by Newton's method (IRLS), applied with numpy alone.

Fitting happens once, on the dev split, on whatever machine runs
``edge-runtime calibrate``; inference on the device is one dot product. A dozen
lines of Newton iterations do not justify a scikit-learn dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LogisticModel", "fit_logistic"]


@dataclass(frozen=True)
class LogisticModel:
    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float

    def decision(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(x) - self.mean) / self.std
        return z @ self.coef + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.decision(x), -40, 40)))

    def to_dict(self) -> dict[str, object]:
        return {"features": list(self.features), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LogisticModel:
        feats = tuple(str(f) for f in d["features"])  # type: ignore[union-attr]
        arrays = [np.asarray(d[k], dtype=float) for k in ("mean", "std", "coef")]
        if any(a.shape != (len(feats),) for a in arrays):
            raise ValueError("mean, std and coef must each have one value per feature")
        intercept = float(d["intercept"])  # type: ignore[arg-type]
        if not all(np.isfinite(a).all() for a in arrays) or not np.isfinite(intercept):
            raise ValueError("mean, std, coef and intercept must be finite numbers")  # NaN would score every answer NaN
        if (arrays[1] <= 0).any():  # the features are divided by it: 0 scores NaN, a negative one flips the sign
            raise ValueError("std must be positive numbers (fitting writes 1 for a feature that never varied)")
        return cls(feats, arrays[0], arrays[1], arrays[2], intercept)


def fit_logistic(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], *, l2: float = 1.0, iterations: int = 50) -> LogisticModel:
    """Fit on standardised features; ``l2`` is the ridge penalty on the coefficients (not the intercept)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    z = np.hstack([(x - mean) / std, np.ones((x.shape[0], 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -40, 40)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(z.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return LogisticModel(features, mean, std, w[:-1], float(w[-1]))
