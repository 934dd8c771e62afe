"""Early exit: stop local decoding once the running confidence falls below a bar.

The device then stops spending energy on an answer that would be discarded and
escalates at once. The running confidence after ``t`` tokens is computed from
the tokens so far with one of these signals:

``mean_prob``   geometric-mean token probability, exp(mean logprob)
``min_prob``    probability of the least likely token so far, exp(min logprob)
``min_margin``  smallest top-1 minus top-2 probability so far
``trajectory``  a running confidence computed elsewhere: live from
                ``confidence_fn(tokens)``, in replay from ``records.trajectory``

The check starts once ``min_tokens`` tokens exist, and a runtime calls
:meth:`~edge_runtime.policies.Policy.during` after every token, the last one included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidRequestError
from ._base import Decision, Policy, Reason, RequestContext, TokenSignal, check_keys, number
from ._registry import register_policy

__all__ = ["EarlyExit", "running_confidence", "SIGNALS"]

log = logging.getLogger(__name__)

SIGNALS = ("mean_prob", "min_prob", "min_margin", "trajectory")


def _running_matrix(logprobs: np.ndarray | None, margins: np.ndarray | None, signal: str) -> np.ndarray:
    """Running confidence for each prefix; rows are items, columns tokens, NaN-padded on the right."""
    if signal == "mean_prob":
        assert logprobs is not None
        count = np.arange(1, logprobs.shape[1] + 1)
        return np.exp(np.nancumsum(logprobs, axis=1) / count)
    if signal == "min_prob":
        assert logprobs is not None
        return np.exp(np.fmin.accumulate(logprobs, axis=1))
    if signal == "min_margin":
        assert margins is not None
        return np.fmin.accumulate(margins, axis=1)
    raise ValueError(f"signal {signal!r} is not computed from token signals")


def running_confidence(logprobs: Sequence[float], margins: Sequence[float] | None = None, *,
                       signal: str = "mean_prob") -> np.ndarray:
    """Running confidence after each token (``out[t]`` uses tokens ``0..t``); ``margins`` are needed for
    ``signal="min_margin"``."""
    if signal == "min_margin" and margins is None:  # it was a bare AssertionError (QA UU)
        raise InvalidRequestError("signal 'min_margin' reads the tokens' margins: pass them", field="margins")
    lp = np.asarray(logprobs, dtype=float)[None, :]
    mg = None if margins is None else np.asarray(margins, dtype=float)[None, :]
    if lp.shape[1] == 0:
        return np.zeros(0)
    return _running_matrix(lp, mg, signal)[0]


def _field(t: Any, name: str) -> float:
    return float(t[name] if isinstance(t, Mapping) else getattr(t, name))


@register_policy
class EarlyExit(Policy):
    """Stop decoding and escalate when the running confidence after ``min_tokens`` or more
    tokens is below ``bar``."""

    type_name = "early_exit"

    def __init__(self, bar: float, min_tokens: int = 4, signal: str = "mean_prob", *,
                 confidence_fn: Callable[[Sequence[TokenSignal]], float] | None = None) -> None:
        if isinstance(bar, bool) or not isinstance(bar, (int, float)) or not 0.0 <= bar <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {bar!r}", field="policy.bar")
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ConfigError(f"must be an integer >= 1, got {min_tokens!r}", field="policy.min_tokens")
        if signal not in SIGNALS:
            raise ConfigError(f"unknown signal {signal!r} (expected one of {', '.join(SIGNALS)})",
                              field="policy.signal")
        if confidence_fn is not None and signal != "trajectory":
            raise ConfigError("confidence_fn is only used with signal 'trajectory'", field="policy.signal")
        self.bar = float(bar)
        self.min_tokens = min_tokens
        self.signal = signal
        self.confidence_fn = confidence_fn

    def running_confidence(self, tokens: Sequence[TokenSignal]) -> float:
        """Confidence after the tokens so far."""
        if self.signal == "trajectory":
            if self.confidence_fn is None:
                raise ConfigError("early_exit with signal 'trajectory' needs a confidence_fn to run live",
                                  field="policy.signal")
            return float(self.confidence_fn(tokens))
        lp = [_field(t, "logprob") for t in tokens]
        mg = [_field(t, "margin") for t in tokens] if self.signal == "min_margin" else None
        return float(running_confidence(lp, mg, signal=self.signal)[-1])

    def should_stop(self, tokens: Sequence[TokenSignal]) -> bool:
        """True when decoding should stop now, given the per-token signals so far."""
        return len(tokens) >= self.min_tokens and self.running_confidence(tokens) < self.bar

    def _during(self, ctx: RequestContext, tokens: Sequence[TokenSignal]) -> Decision | None:
        if len(tokens) < self.min_tokens:
            return None
        c = self.running_confidence(tokens)
        if c >= self.bar:
            return None
        return Decision("cloud", Reason.EARLY_EXIT,
                        f"running confidence ({self.signal}) {c:.3f} < {self.bar:.3f} after {len(tokens)} tokens: "
                        "stopped local decoding", policy=self.type_name, value=c, threshold=self.bar)

    def _params(self) -> dict[str, Any]:
        return {"bar": self.bar, "min_tokens": self.min_tokens, "signal": self.signal}

    def _describe(self) -> str:
        # the signal is in the label: copied into a config without it, the label would be another policy
        return f"early_exit({self.signal}<{self.bar:g},k={self.min_tokens})"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> EarlyExit:
        check_keys(cfg, ("bar", "min_tokens", "signal"), where)
        bar = number(cfg, "bar", where, lo=0.0, hi=1.0)
        k = number(cfg, "min_tokens", where, lo=1, default=4, integer=True)
        signal = cfg.get("signal", "mean_prob")
        if signal not in SIGNALS:
            raise ConfigError(f"unknown signal {signal!r} (expected one of {', '.join(SIGNALS)})",
                              field=f"{where}.signal")
        return cls(bar, k, signal)

    def _replay_during(self, records: Any) -> np.ndarray:
        conf = records.running(self.signal)
        if conf.shape[1] == 0:
            return np.full(records.n, -1, dtype=np.int64)
        cols = np.arange(conf.shape[1])
        with np.errstate(invalid="ignore"):
            in_answer = cols[None, :] < records.n_tokens[:, None]
            cond = (conf < self.bar) & in_answer & (cols[None, :] >= self.min_tokens - 1)
        return np.where(cond.any(axis=1), cond.argmax(axis=1), -1)
