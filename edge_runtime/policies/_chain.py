"""Composition: several policies asked in order (see the stage rules in ``_base``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from ._base import Policy, check_keys
from ._registry import policy_from_config, register_policy

__all__ = ["Chain"]


@register_policy
class Chain(Policy):
    """Parts asked in order; the first definite answer at each stage wins; gates veto any escalation.

    Nested chains are flattened. ``Chain([privacy, budget, threshold])`` reads:
    "keep private prompts local, stop escalating once the money is spent,
    otherwise escalate when p_correct is below the threshold".
    """

    type_name = "chain"

    def __init__(self, policies: Iterable[Policy]) -> None:
        flat: list[Policy] = []
        for p in policies:
            if not isinstance(p, Policy):
                raise ConfigError(f"chain parts must be policies, got {type(p).__name__}", field="policy.chain")
            flat.extend(p.parts())
        if not flat:
            raise ConfigError("a chain needs at least one policy", field="policy.chain")
        self._parts = tuple(flat)

    def parts(self) -> tuple[Policy, ...]:
        return self._parts

    def to_config(self) -> dict[str, Any]:
        return {"chain": [p.to_config() for p in self._parts]}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Policy:
        # {"type": "chain", "policies": [...]} is accepted too; the canonical form is {"chain": [...]}
        check_keys(cfg, ("policies",), where)
        return policy_from_config({"chain": cfg.get("policies", [])}, where=where)

    def __repr__(self) -> str:
        return f"Chain([{', '.join(repr(p) for p in self._parts)}])"
