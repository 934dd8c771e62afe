"""Pre-routing: decide from the prompt alone, before any energy is spent on decoding.

A pre-router maps a request to an estimate of the local model's p_correct
(for instance k-nearest-neighbours over prompt embeddings of labelled dev
items, or the prompt's perplexity). Below ``bar`` the request goes to the
cloud at once; otherwise the rest of the policy decides, or, with
``decide_local``, it is answered locally without a further check.

Pre-routers are named in configs through :func:`register_pre_router`;
without a scorer the policy reads ``RequestContext.pre_route_p_correct``,
computed by the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ._base import Decision, Policy, Reason, RequestContext, check_keys, number, score_or_none
from ._registry import register_policy

__all__ = ["PreRoute", "register_pre_router", "PRE_ROUTERS"]


Scorer = Callable[[RequestContext], "float | None"]
#: name -> factory(**params) returning a scorer
PRE_ROUTERS: dict[str, Callable[..., Scorer]] = {}


def register_pre_router(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: ``{"type": "pre_route", "scorer": {"type": name, ...params}}`` calls ``factory(**params)``."""

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        PRE_ROUTERS[name] = factory
        return factory

    return deco


@register_pre_router("context")
def _context_scorer() -> Scorer:
    """The score the runtime put in ``RequestContext.pre_route_p_correct``."""
    return lambda ctx: ctx.pre_route_p_correct


@register_policy
class PreRoute(Policy):
    """Escalate before decoding when the prompt-only estimate of p_correct is below ``bar``."""

    type_name = "pre_route"

    def __init__(self, bar: float, scorer: Scorer | None = None, *, decide_local: bool = False,
                 scorer_config: Mapping[str, Any] | str | None = None) -> None:
        if isinstance(bar, bool) or not isinstance(bar, (int, float)) or not 0.0 <= bar <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {bar!r}", field="policy.bar")
        self.bar = float(bar)
        self.decide_local = bool(decide_local)
        self.scorer = scorer or _context_scorer()
        if scorer_config is not None:
            self.scorer_config: dict[str, Any] | str = (
                scorer_config if isinstance(scorer_config, str) else dict(scorer_config))
        elif scorer is None:
            self.scorer_config = "context"
        else:  # a Python callable has no config name; from_config rejects this form with a clear message
            module = getattr(scorer, "__module__", "?")
            self.scorer_config = f"python:{module}.{getattr(scorer, '__qualname__', repr(scorer))}"

    def score(self, ctx: RequestContext) -> float | None:
        return score_or_none("pre-router", self.scorer, ctx)

    def _before(self, ctx: RequestContext) -> Decision | None:
        p = self.score(ctx)
        if p is None:
            return None
        if p < self.bar:
            return Decision("cloud", Reason.PRE_ROUTE_LOW, f"prompt-only p_correct {p:.3f} < {self.bar:.3f}: "
                            "escalated before decoding", policy=self.type_name, value=p, threshold=self.bar)
        if self.decide_local:
            return Decision("local", Reason.PRE_ROUTE_HIGH, f"prompt-only p_correct {p:.3f} >= {self.bar:.3f}: "
                            "answered locally", policy=self.type_name, value=p, threshold=self.bar)
        return None

    def _params(self) -> dict[str, Any]:
        return {"bar": self.bar, "scorer": self.scorer_config, "decide_local": self.decide_local}

    def _describe(self) -> str:
        # what differs from the defaults is in the label: copied into a config without it, it is another policy
        extra = "" if self.scorer_config == "context" else \
            f",scorer={self.scorer_config if isinstance(self.scorer_config, str) else self.scorer_config.get('type')}"
        return f"pre_route(bar={self.bar:g}{',local' if self.decide_local else ''}{extra})"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> PreRoute:
        check_keys(cfg, ("bar", "scorer", "decide_local"), where)
        bar = number(cfg, "bar", where, lo=0.0, hi=1.0)
        decide_local = cfg.get("decide_local", False)
        if not isinstance(decide_local, bool):
            raise ConfigError(f"must be true or false, got {decide_local!r}", field=f"{where}.decide_local")
        spec = cfg.get("scorer", "context")
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
            raise ConfigError("must be a pre-router name or a table with a 'type'", field=f"{where}.scorer")
        factory = PRE_ROUTERS.get(spec["type"])
        if factory is None:
            raise ConfigError(f"unknown pre-router {spec['type']!r} (registered: {', '.join(sorted(PRE_ROUTERS))})",
                              field=f"{where}.scorer.type")
        params = {k: v for k, v in spec.items() if k != "type"}
        try:
            scorer = factory(**params)
        except TypeError as err:
            raise ConfigError(f"bad parameters for pre-router {spec['type']!r}: {err}",
                              field=f"{where}.scorer") from err
        if spec["type"] == "context" and not params:
            return cls(bar, decide_local=decide_local)
        return cls(bar, scorer, decide_local=decide_local, scorer_config=spec["type"] if not params else dict(spec))

    def _replay_before(self, records: Any) -> tuple[np.ndarray, np.ndarray]:
        p = records.require("pre_route_p", "a pre_route policy needs pre-route scores")
        with np.errstate(invalid="ignore"):
            low = p < self.bar
            high = (p >= self.bar) if self.decide_local else np.zeros(records.n, dtype=bool)
        codes = np.where(low, 2, np.where(high, 1, 0)).astype(np.int8)
        reasons = np.where(low, Reason.PRE_ROUTE_LOW, Reason.PRE_ROUTE_HIGH).astype(object)
        return codes, reasons
