"""Escalation policies: when to answer on the device and when to ask the cloud.

Deciders: :class:`Never`, :class:`Always`, :class:`Threshold` (``p_correct < p``),
:class:`TargetRate` (threshold at the quantile that escalates a share of
calibration traffic), :class:`EarlyExit` (stop decoding when the running
confidence drops), :class:`PreRoute` (decide from the prompt before decoding),
:class:`Gain` (escalate when the cloud is expected to beat the device).
Gates: :class:`Privacy` (sensitive prompts never leave the device),
:class:`Budget` (cloud spend cap per period). :class:`Chain` composes them; the
stage rules are in ``_base``'s docstring. Every :class:`Decision` carries a
machine-readable ``reason`` (see :class:`Reason`) and a ``detail`` sentence.

Config (daemon file, explorer output)::

    policy_from_config({"chain": [{"type": "privacy"},
                                  {"type": "budget", "usd_per_day": 1.0},
                                  {"type": "threshold", "p": 0.5}]})

Offline: :func:`replay` applies a policy (or its config) to cached runs.
"""

from __future__ import annotations

from ._base import Action, Decision, Policy, Reason, RequestContext, TokenSignal
from ._budget import Budget
from ._chain import Chain
from ._early_exit import SIGNALS, EarlyExit, running_confidence
from ._gain import Gain
from ._pre_route import PRE_ROUTERS, PreRoute, register_pre_router
from ._privacy import BUILTIN_PATTERNS, Privacy
from ._registry import POLICY_TYPES, policy_from_config, register_policy
from ._replay import ROUTES, STAGES, ReplayRecords, ReplayResult, replay
from ._simple import Always, Never, TargetRate, Threshold, threshold_for_rate

__all__ = [
    "Action",
    "Decision",
    "Reason",
    "RequestContext",
    "TokenSignal",
    "Policy",
    "Never",
    "Always",
    "Threshold",
    "TargetRate",
    "threshold_for_rate",
    "Budget",
    "EarlyExit",
    "Gain",
    "running_confidence",
    "SIGNALS",
    "PreRoute",
    "register_pre_router",
    "PRE_ROUTERS",
    "Privacy",
    "BUILTIN_PATTERNS",
    "Chain",
    "POLICY_TYPES",
    "register_policy",
    "policy_from_config",
    "ReplayRecords",
    "ReplayResult",
    "replay",
    "ROUTES",
    "STAGES",
]
