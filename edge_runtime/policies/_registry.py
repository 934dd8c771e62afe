"""Name -> class registry and :func:`policy_from_config`, so config files can name a policy.

Accepted shapes::

    "never"                                         # a bare type name
    {"type": "threshold", "p": 0.6}                 # one policy
    {"chain": [{"type": "privacy"},                 # several, asked in order
               {"type": "budget", "usd_per_day": 1.0},
               {"type": "threshold", "p": 0.5}]}

``policy.to_config()`` returns the canonical form of the same policy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ._base import Policy

__all__ = ["POLICY_TYPES", "register_policy", "policy_from_config"]

POLICY_TYPES: dict[str, type[Policy]] = {}

P = TypeVar("P", bound="type[Policy]")


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` constructible from config under ``cls.type_name``."""
    name = cls.type_name
    if not name:
        raise ValueError(f"{cls.__name__} has no type_name")
    if name in POLICY_TYPES and POLICY_TYPES[name] is not cls:
        raise ValueError(f"policy type {name!r} is already registered by {POLICY_TYPES[name].__name__}")
    POLICY_TYPES[name] = cls
    return cls


def policy_from_config(cfg: Any, *, where: str = "policy") -> Policy:
    """Build a policy from a config value (see the module docstring). Errors are
    :class:`~edge_runtime.errors.ConfigError` naming the field, e.g. ``policy.chain[1].usd_per_day``."""
    from ._base import Policy
    from ._chain import Chain

    if isinstance(cfg, Policy):
        return cfg
    if isinstance(cfg, str):
        if "(" in cfg or "+" in cfg:
            # a label as describe() and the explorer write it ("early_exit(min_prob<0.2,k=4)+gain(min=0.3)", which
            # the README shows beside its config): named an unknown policy, while listing the very name it starts with
            types = [part.split("(", 1)[0].strip() for part in cfg.split("+")]
            table = ", ".join(f'{{type = "{t}", ...}}' for t in types)
            raise ConfigError(f"{cfg!r} is a policy's label, not its config: write it as a table, "
                              f"{table if len(types) == 1 else '{chain = [' + table + ']}'} with the parameters "
                              "spelt out (`edge-runtime explore` writes each label's config beside it)", field=where)
        cfg = {"type": cfg}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"must be a policy name or a table, got {type(cfg).__name__}", field=where)
    if "chain" in cfg:
        extra = [k for k in cfg if k not in ("chain", "type")]
        if extra or cfg.get("type", "chain") != "chain":
            raise ConfigError("a chain table holds only 'chain'", field=f"{where}.{extra[0] if extra else 'type'}")
        items = cfg["chain"]
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
            raise ConfigError("must be a non-empty list of policies", field=f"{where}.chain")
        return Chain([policy_from_config(c, where=f"{where}.chain[{i}]") for i, c in enumerate(items)])
    name = cfg.get("type")
    if name is None:
        raise ConfigError("missing (or give 'chain')", field=f"{where}.type")
    cls = POLICY_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown policy {name!r} (expected one of {', '.join(sorted(POLICY_TYPES))})",
                          field=f"{where}.type")
    params = {k: v for k, v in cfg.items() if k != "type"}
    return cls.from_config(params, where=where)
