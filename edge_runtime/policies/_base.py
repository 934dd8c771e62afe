"""Decision types and the one place where the stage semantics of escalation policies live.

A runtime asks a policy three questions per request:

1. :meth:`Policy.before` (before local decoding), answered with ``"cloud"``
   (escalate now, skip local decoding), ``"local"`` (answer locally, ask
   nothing more), ``"local_forced"`` (must stay on the device: privacy, budget)
   or ``"continue"``;
2. :meth:`Policy.during` (after each generated token, with the token signals
   so far), answered with ``"cloud"`` (stop decoding and escalate),
   ``"local_forced"`` (an escalation was wanted but is not allowed; keep
   decoding and answer locally) or ``"continue"``;
3. :meth:`Policy.after` (given the answer's ``p_correct``), answered with
   ``"cloud"``, ``"local"`` or ``"local_forced"``.

After a cloud call the runtime reports its cost with :meth:`Policy.settle`
(``0.0`` when the call failed), so spend caps count what was really spent.

Composition (:class:`~edge_runtime.policies.Chain`): at each stage the parts
are asked in order and the first definite answer wins. Every escalation,
whichever part proposed it and at whichever stage, must then pass every
*gate* (privacy, budget), wherever the gate is listed; a gate's veto turns it
into ``"local_forced"`` with the gate's reason. A single policy is a chain of
one, so the same rules apply to it.

Subclasses implement the private hooks ``_before/_during/_after`` (return
``None`` for "no opinion"), ``_admit/_release/_settle`` (gates) and the
vectorised ``_replay_*`` hooks used by :func:`~edge_runtime.policies.replay`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from ..config import is_finite
from ..errors import ConfigError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ._replay import ReplayRecords

__all__ = [
    "Action",
    "Decision",
    "RequestContext",
    "TokenSignal",
    "Policy",
    "Reason",
]

Action = Literal["continue", "local", "cloud", "local_forced"]
ACTIONS: tuple[str, ...] = ("continue", "local", "cloud", "local_forced")


class Reason:
    """Machine-readable reason codes (``Decision.reason``). Privacy reasons carry the
    pattern name after a colon: ``privacy_pattern:email``."""

    CONTINUE = "continue"
    DEFAULT_LOCAL = "default_local"  # no part of the policy wanted the cloud
    NEVER = "policy_never"
    ALWAYS = "policy_always"
    BELOW_THRESHOLD = "p_correct_below_threshold"
    AT_OR_ABOVE_THRESHOLD = "p_correct_at_or_above_threshold"
    EARLY_EXIT = "early_exit"
    PRE_ROUTE_LOW = "pre_route_low_confidence"
    PRE_ROUTE_HIGH = "pre_route_high_confidence"
    BUDGET_EXHAUSTED = "budget_exhausted"
    BUDGET_PRICES_UNKNOWN = "budget_prices_unknown"
    PRIVACY_PREFIX = "privacy_pattern:"


@dataclass(frozen=True)
class Decision:
    """What to do, why (``reason``: a code from :class:`Reason`) and a sentence for people.

    ``policy`` names the part that decided; ``value`` is the number it looked
    at (p_correct, pre-route score, running confidence) and ``threshold`` the
    bar it compared it with, when there was one.
    """

    action: Action
    reason: str
    detail: str = ""
    policy: str = ""
    value: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")

    @property
    def escalate(self) -> bool:
        return self.action == "cloud"

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "detail": self.detail,
            "policy": self.policy,
            "value": self.value,
            "threshold": self.threshold,
        }


_CONTINUE = Decision("continue", Reason.CONTINUE)


@dataclass(frozen=True)
class RequestContext:
    """What a policy may know about a request before and while it is answered.

    ``estimated_cloud_usd``: the runtime's estimate of what escalating would cost
    (a budget reserves it); ``pre_route_p_correct``: a prompt-only estimate the
    runtime already computed (used by ``pre_route`` when it has no scorer of
    its own); ``admission_id`` ties a budget reservation to its settlement (not ``request_id``, which a client
    chooses: two requests under one id must not settle each other's reservations).
    """

    messages: Sequence[Mapping[str, Any]] = ()
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    admission_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    estimated_cloud_usd: float = 0.0
    pre_route_p_correct: float | None = None
    features: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_prompt(cls, prompt: str, **kwargs: Any) -> RequestContext:
        return cls(messages=({"role": "user", "content": prompt},), **kwargs)

    def texts(self) -> list[str]:
        """The text of every message (system, user, earlier turns)."""
        out = []
        for m in self.messages:
            content = m.get("content", "")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            out.append(str(content))
        return out

    @property
    def prompt_text(self) -> str:
        """The last user message (what a pre-router scores)."""
        for m, text in zip(reversed(self.messages), reversed(self.texts())):
            if m.get("role") == "user":
                return text
        return ""


class TokenSignal(Protocol):
    """Per-token signals the engine reports (``edge_runtime.engine.types.TokenInfo`` has them)."""

    logprob: float
    margin: float


class Policy:
    """Base of every escalation policy. See the module docstring for the stage rules."""

    type_name: ClassVar[str] = ""
    #: True for parts that may veto escalations (privacy, budget)
    is_gate: ClassVar[bool] = False

    # ---- what a runtime calls ----------------------------------------------------------

    def parts(self) -> tuple[Policy, ...]:
        """The leaf policies, in order (a leaf is its own only part)."""
        return (self,)

    def before(self, ctx: RequestContext) -> Decision:
        """Before local decoding: ``cloud``, ``local``, ``local_forced`` or ``continue``."""
        for p in self.parts():
            d = p._before(ctx)
            if d is not None and d.action != "continue":
                return self._admit_all(ctx, d) if d.action == "cloud" else d
        return _CONTINUE

    def during(self, ctx: RequestContext, tokens: Sequence[TokenSignal]) -> Decision:
        """After each generated token: ``cloud`` (stop now and escalate), ``local_forced`` or ``continue``."""
        for p in self.parts():
            d = p._during(ctx, tokens)
            if d is not None and d.action == "cloud":
                return self._admit_all(ctx, d)
        return _CONTINUE

    def after(self, ctx: RequestContext, p_correct: float) -> Decision:
        """Given the local answer's ``p_correct``: ``cloud``, ``local`` or ``local_forced``."""
        for p in self.parts():
            d = p._after(ctx, p_correct)
            if d is not None and d.action != "continue":
                return self._admit_all(ctx, d) if d.action == "cloud" else d
        return Decision("local", Reason.DEFAULT_LOCAL, "no part of the policy asked for the cloud",
                        policy=self.type_name, value=p_correct)

    def admit(self, ctx: RequestContext, proposal: Decision) -> Decision:
        """Run the gates (privacy, budget) on an escalation proposed outside the policy, e.g. by a request that
        names the cloud model: ``proposal`` when they allow it, else their ``local_forced`` veto."""
        return self._admit_all(ctx, proposal)

    def settle(self, ctx: RequestContext, usd: float) -> None:
        """Report what an escalation admitted for ``ctx`` really cost (0.0 if the cloud call failed)."""
        for p in self.parts():
            p._settle(ctx, usd)

    def describe(self) -> str:
        """Short human-readable name, e.g. ``privacy+budget($1/day)+threshold(p=0.6)``
        (the explorer names the policies it measures the same way)."""
        return "+".join(p._describe() for p in self.parts())

    # ---- configuration ------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """A dict :func:`~edge_runtime.policies.policy_from_config` turns back into an equal policy."""
        return {"type": self.type_name, **self._params()}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "policy") -> Policy:
        """Build from the keys of a config table other than ``type``; errors name ``where.key``."""
        return cls(**cfg)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_config() == self.to_config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self.to_config()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    # ---- hooks for subclasses -------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {}

    def _describe(self) -> str:
        return self.type_name

    def _before(self, ctx: RequestContext) -> Decision | None:
        return None

    def _during(self, ctx: RequestContext, tokens: Sequence[TokenSignal]) -> Decision | None:
        return None

    def _after(self, ctx: RequestContext, p_correct: float) -> Decision | None:
        return None

    def _admit(self, ctx: RequestContext) -> Decision | None:
        """Gates: return a ``local_forced`` decision to veto an escalation, None to allow it."""
        return None

    def _release(self, ctx: RequestContext) -> None:
        """Gates: undo what ``_admit`` reserved when a later gate vetoed the escalation."""

    def _settle(self, ctx: RequestContext, usd: float) -> None:
        pass

    def _admit_all(self, ctx: RequestContext, proposal: Decision) -> Decision:
        admitted: list[Policy] = []
        for p in self.parts():
            veto = p._admit(ctx)
            if veto is not None:
                for q in admitted:
                    q._release(ctx)
                return veto
            admitted.append(p)
        return proposal

    # ---- offline replay (vectorised); see _replay.py ------------------------------------------
    # Each returns None when the part has no hook at that stage.

    def _replay_before(self, records: ReplayRecords) -> tuple[np.ndarray, Any] | None:
        """(action codes per item: 0 continue, 1 local, 2 cloud, 3 local_forced; reason str or array)."""
        return None

    def _replay_during(self, records: ReplayRecords) -> np.ndarray | None:
        """Index of the token after which decoding stops (-1: never)."""
        return None

    def _replay_after(self, records: ReplayRecords) -> tuple[np.ndarray, Any] | None:
        return None

    def _replay_veto(self, records: ReplayRecords) -> tuple[np.ndarray, Any] | None:
        """Gates without state: (mask of items whose escalation is vetoed, reason str or array)."""
        return None


def check_keys(cfg: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = [k for k in cfg if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown key (expected {', '.join(allowed) or 'none'})", field=f"{where}.{unknown[0]}")


def number(cfg: Mapping[str, Any], key: str, where: str, *, lo: float | None = None, hi: float | None = None,
           default: Any = ..., integer: bool = False) -> Any:
    """Read a numeric config value; errors name the field."""
    if key not in cfg:
        if default is ...:
            raise ConfigError("missing", field=f"{where}.{key}")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ConfigError(f"must be {'an integer' if integer else 'a number'}, got {v!r}", field=f"{where}.{key}")
    if not is_finite(v):  # NaN never compares; inf is a TOML value, and no setting here means "unlimited"
        raise ConfigError(f"must be a finite number, got {v!r:.40}", field=f"{where}.{key}")
    if lo is not None and v < lo:
        raise ConfigError(f"must be >= {lo}, got {v}", field=f"{where}.{key}")
    if hi is not None and v > hi:
        raise ConfigError(f"must be <= {hi}, got {v}", field=f"{where}.{key}")
    return v


def score_or_none(what: str, score: Callable[..., float | None], *args: Any) -> float | None:
    """A prompt-only estimate, or None (no opinion) when it fails or is not a number: the later stages decide.

    A broken scorer must not fail the request, and NaN is no opinion, not a confident answer.
    """
    try:
        p = score(*args)
        if p is None:
            return None
        p = float(p)  # a custom scorer's "high" or [0.4] failed the request as a bare error (review 29)
    except Exception:
        log.exception("%s failed; deciding without it", what)
        return None
    return p if 0.0 <= p <= 1.0 else None  # (nan and 1.7 too: a probability, or no opinion)
