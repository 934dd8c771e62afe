"""One call that answers on the device or escalates to the cloud, with an account of what it cost.

::

    from edge_runtime.hybrid import HybridRuntime

    runtime = HybridRuntime.from_config("edge-runtime.toml")
    result = runtime.chat([{"role": "user", "content": "What is 17 * 23?"}], max_new_tokens=32)
    result.text, result.route, result.reason, result.p_correct, result.cost, result.energy

Routes: ``local`` (answered on the device), ``cloud`` (escalated and answered
by the bridge), ``fallback`` (escalation was wanted but the cloud failed or answered
with no text: the local answer comes back, never nothing), ``local_forced`` (the policy wanted
the cloud but a gate — privacy, budget, no cloud configured — kept it local; or the caller
cancelled, reason ``cancelled``). A local answer the caller cut short is never scored
(``p_correct`` None); if its route was still undecided it comes back ``local_forced`` with
reason ``cancelled``, never escalated.

The policy (``edge_runtime.policies``) is asked before decoding (pre-routing,
privacy), after every token (early exit) and after the answer (threshold on
``p_correct``). While the answer may still be withdrawn, :meth:`stream` holds
local text back, so a caller never sees tokens that are then replaced by the
cloud's answer unless it opts in with ``reveal_draft=True`` (it then gets a
``withdraw`` chunk before the cloud's text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ._logging import Throttle
from .confidence import Estimator, check_bundle_hash, fitted_on_another_model, load_estimator, no_answer, signals_from_result
from .cost import CostSettings, device_energy_usd, network_energy_j, wait_energy_j
from .engine import Engine, GenerationResult, SamplingParams, TokenInfo, validate_messages
from .engine.engine import _cancel_check
from .engine.types import MAX_NEW_TOKENS_LIMIT, EnergyReport, log_text, short_repr
from .errors import (
    CircuitOpenError,
    CloudBill,
    CloudCancelledError,
    CloudError,
    CloudPriceError,
    CloudResponseTooLargeError,
    CloudTimeoutError,
    ConfigError,
    ContextLengthError,
    EdgeRuntimeError,
    EstimatorError,
    InvalidRequestError,
    ModelFetchError,
    OutOfMemoryError,
)
from .policies import Decision, Policy, Privacy, RequestContext, policy_from_config
from .policies._base import score_or_none as _score_or_none

__all__ = ["HybridRuntime", "HybridResult", "HybridChunk", "Cost", "Route", "MODEL_ALIASES"]

log = logging.getLogger(__name__)
# the most often an escalation the client skipped (circuit open, quota spent) is logged as a warning
_SKIPPED_LOG_INTERVAL_S = 60.0

Route = Literal["local", "cloud", "fallback", "local_forced"]
# what a request may ask for: the policy decides, or it pins one side
MODEL_ALIASES = ("auto", "local", "cloud")


class Cost(TypedDict):
    """What an answer cost (``HybridResult.cost``): USD and joules, and two flags (see the README)."""

    cloud_usd: float  # the bridge's bill
    device_energy_usd: float  # the device's joules at [cost] electricity_usd_per_kwh
    network_energy_j: float  # the radio's, estimated
    total_usd: float
    cloud_usd_unknown: bool  # an escalation cut after the bridge took it: it may have billed what the device never saw
    device_energy_estimated: bool


@dataclass(frozen=True)
class HybridResult:
    """One answered request.

    ``route``: ``local``, ``cloud``, ``fallback`` (an escalation failed: the local answer, with ``cloud_error``) or
    ``local_forced`` (a gate kept it local); ``reason`` and ``detail`` say why, ``policy`` and ``threshold`` which
    rule decided, ``p_correct`` the estimator's probability that the local answer is right (None: no estimate).
    ``draft``: the local answer when the cloud's was returned. ``usage``: token counts per side (``local``,
    ``cloud``); ``latency_ms``: per stage; ``energy``: the device's ``joules`` (its ``source``, ``estimated`` unless
    a counter measured them, ``process_joules``, ``seconds``, ``estimator_joules`` included in joules) plus the
    escalation's estimated ``network_joules`` and ``wait_joules`` (idle power while waiting); ``cost``: USD (see
    :class:`Cost`).
    """

    request_id: str
    text: str
    route: Route
    reason: str  # machine-readable (edge_runtime.policies.Reason codes, plus cloud_error / requested_*)
    detail: str
    p_correct: float | None
    threshold: float | None
    policy: str
    model: str  # the model that actually answered
    finish_reason: str
    draft: str | None  # the local answer, when the cloud answered instead
    # local tokens of the returned answer's text (empty when the cloud answered; no eos, none of a cut stop string)
    tokens: list[TokenInfo]
    usage: dict[str, dict[str, int]]
    latency_ms: dict[str, float]
    energy: dict[str, Any]
    cost: Cost
    cloud_error: str | None = None
    # the failed escalation's error class ("CloudTimeoutError", "CircuitOpenError", ...; "EmptyAnswer" for an answer
    # without text), for counting failures by cause without reading messages
    cloud_error_type: str | None = None
    # the local runs' prompt-lookup drafts (engine prompt_lookup): "accepted" and "rejected" token counts
    predictions: dict[str, int] = dataclasses.field(default_factory=lambda: {"accepted": 0, "rejected": 0})
    # local prompt tokens whose KV state was kept from an earlier request or turn, not prefilled again
    cached_prompt_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tokens"] = [t.to_dict() for t in self.tokens]
        return d


@dataclass(frozen=True)
class HybridChunk:
    """One step of :meth:`HybridRuntime.stream`.

    ``kind``: ``text`` (show it), ``withdraw`` (only with reveal_draft: forget
    the local text shown so far; what follows replaces it: the cloud's answer, or
    after an early exit whose escalation failed, the whole local answer made
    again), ``done`` (the last chunk, with ``result``).
    """

    kind: Literal["text", "withdraw", "done"]
    text: str = ""
    token: TokenInfo | None = None
    result: HybridResult | None = None
    tokens_shown: int | None = None  # the engine's StreamChunk.tokens_shown (local text), counted since a withdraw


class _CloudProgress:
    """How far an escalation got before it failed: whether the bridge took it, whether any answer text came."""

    def __init__(self) -> None:
        self.accepted = False
        self.text = False


@dataclasses.dataclass(frozen=True)
class _PriceState:
    """What the device knows of the bridge's prices, replaced whole: a reader never sees half of an update."""

    prices: tuple[float, float] | None = None  # (input, output) USD per million tokens; None: unknown or unnamed
    answered: bool = False  # a read succeeded (its list may name no price: the [cost] table then)
    due_s: float = -math.inf  # time.monotonic() when they are to be read (again); -inf: never tried
    read_s: float = -math.inf  # time.monotonic() of the last read that succeeded (or refusal that said them)
    generation: int = 0  # counts the times they were found out of date: a read begun before does not count

    @property
    def failed(self) -> bool:
        """A read was tried and none has succeeded since the start, or since they were found out of date."""
        return not self.answered and self.due_s > -math.inf

    @classmethod
    def known(cls, prices: tuple[float, float] | None, generation: int) -> _PriceState:
        """The prices the bridge said now (a read, or a refusal), next read after the refresh interval."""
        now = time.monotonic()
        return cls(prices, answered=True, due_s=now + _PRICES_REFRESH_S, read_s=now, generation=generation)


class _Settlement:
    """Settles a request's budget reservation exactly once, also when its stream is abandoned."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.ctx: RequestContext | None = None
        self.unsettled_usd = 0.0  # what to settle if the request ends without saying: nothing asked, nothing spent
        self._settled = False
        # the prices the reservation was made at (None: no budget, or no price list), and when
        self.prices: tuple[float, float] | None = None
        self.priced_at_s = -math.inf

    def settle(self, usd: float) -> None:
        if not self._settled and self.ctx is not None:
            self._settled = True
            self.policy.settle(self.ctx, usd)

    def close(self) -> None:
        self.settle(self.unsettled_usd)


def _reads_context_score(part: Policy) -> bool:
    """A pre_route part that decides on the estimator's prompt-only score (not its own registered scorer)."""
    return part.type_name == "pre_route" and getattr(part, "scorer_config", None) == "context"


def _finite_or_none(p: float | None) -> float | None:
    """A p_correct to report: None when there is no usable estimate (NaN would be invalid JSON)."""
    return p if p is not None and math.isfinite(p) else None


def _check_call_arguments(cancel: Any, request_id: Any, deadline_s: Any, on_escalate: Any, on_resume: Any = None) -> None:
    """The stream's own arguments, checked before any work: a bad one failed half-way through the answer, or
    looked like a cloud outage (a NaN deadline timed out every escalation and opened the circuit for everyone)."""
    _cancel_check(cancel)  # the engine's own check of it
    for name, hook in (("on_escalate", on_escalate), ("on_resume", on_resume)):
        if hook is not None and not callable(hook):
            raise InvalidRequestError("must be a callable", field=name)
    # what the bridge accepts (a refused id would fail the escalation)
    if request_id not in (None, "") and not (isinstance(request_id, str) and len(request_id) <= 128 and request_id.isprintable()):
        raise InvalidRequestError(f"must be at most 128 printable characters, got {short_repr(request_id)}", field="request_id")
    if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, numbers.Real)
                                   or not math.isfinite(deadline_s)):
        raise InvalidRequestError(f"must be a time.monotonic() value, got {short_repr(deadline_s)}", field="deadline_s")


def _is_cancelled(cancel: Any) -> bool:
    """``cancel`` is a threading.Event, a zero-argument callable or None."""
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


class _Cancelled(Exception):
    """The caller cancelled while the bridge was answering."""


# what an escalation leaves before the request's deadline, to hand back the local answer instead
_DEADLINE_RESERVE_S = 0.25
# how long the bridge's price table (ListModels) is trusted before it is read again
_PRICES_REFRESH_S = 600.0
_PRICES_RETRY_S = 10.0  # after a failed read (budgeted escalations wait for the read)
_PRICES_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class _Timing:
    """A request's deadline (``time.monotonic()``) and who to tell when the engine is no longer needed."""

    deadline_s: float | None = None
    on_escalate: Callable[[], None] | None = None
    # blocks until the engine may be used again after on_escalate; False: it may not (the caller gave up)
    on_resume: Callable[[], bool] | None = None

    def out_of_time(self) -> bool:
        return self.deadline_s is not None and time.monotonic() >= self.deadline_s - _DEADLINE_RESERVE_S

    def cloud_timeout_s(self, configured_s: float | None, local_s: float | None = 0.0,
                        wait_s: float = 0.0) -> float | None:
        """The escalation's timeout: the configured one, cut to the time left; CloudTimeoutError if none is left.

        ``local_s``: how long the local answer would take to make, when there is none
        yet (a request sent to the cloud first, or an early exit): that time is left
        for the fallback, but never more than half of what remains (``None``: the
        engine's pace is not known yet, half), and none when the fallback could not
        be made in time anyway (then the bridge is the only chance of an answer).
        ``wait_s``: how long the fallback may first wait for the engine (handed on meanwhile), kept too when
        both fit; when only the answer itself fits, that is what is kept (a single request on an idle daemon
        waits for nothing, and was given no time for its fallback at all).
        """
        if self.deadline_s is None:
            return configured_s
        left_s = self.deadline_s - _DEADLINE_RESERVE_S - time.monotonic()
        if local_s is not None and local_s + wait_s < left_s:
            local_s += wait_s
        if left_s > 0 and local_s != 0.0 and (local_s is None or local_s < left_s):
            left_s -= left_s / 2 if local_s is None else min(local_s, left_s / 2)
        if left_s <= 0:
            raise CloudTimeoutError("no time left before the request's deadline to ask the bridge")
        from .cloud._settings import MAX_SECONDS  # (not at import: the cloud package brings grpc)

        # a call's timeout is at most a day (gRPC fails a farther deadline at once): a request given longer (a
        # daemon's request_timeout_s of days) still asks the bridge, review 25
        left_s = min(left_s, MAX_SECONDS)
        return left_s if configured_s is None else min(configured_s, left_s)


class _LocalPace:
    """How fast the engine has been answering here, by the wall clock (moving averages).

    Tells an escalation with no local answer behind it how long a fallback would
    take to make, so that a slow bridge still leaves the time to make it.
    """

    _WEIGHT = 0.2  # of the newest run
    # a prompt read almost whole from the KV cache prefills a token or two: the first step's fixed cost divided by
    # them read 4-5x the real rate (review 30), and a fallback was then given no time at all
    _MIN_PREFILL_TOKENS = 32

    def __init__(self) -> None:
        self.prefill_s_per_token: float | None = None
        self.decode_s_per_token: float | None = None

    def record(self, prompt_tokens: int, first_token_s: float, total_s: float, tokens: int) -> None:
        def mix(old: float | None, new: float) -> float:
            return new if old is None else old + self._WEIGHT * (new - old)

        if prompt_tokens >= self._MIN_PREFILL_TOKENS:
            self.prefill_s_per_token = mix(self.prefill_s_per_token, first_token_s / prompt_tokens)
        if tokens > 1:
            self.decode_s_per_token = mix(self.decode_s_per_token, (total_s - first_token_s) / (tokens - 1))

    def estimate_s(self, prompt_tokens: int, max_new_tokens: int) -> float | None:
        """The time a local answer of at most ``max_new_tokens`` would take; None before any answer was timed."""
        # None until a prefill long enough to time was seen (only short prompts so far): the bridge then gets half the
        # time left; a decode step's time standing in for prefill's made fallbacks look impossible, and the bridge
        # got it all (review 32)
        if self.prefill_s_per_token is None or self.decode_s_per_token is None:
            return None
        return prompt_tokens * self.prefill_s_per_token + max_new_tokens * self.decode_s_per_token

    def watch(self, stream: Iterator[Any], prompt_tokens: int) -> Iterator[Any]:
        """``stream`` (the engine's chunks) as is, timing it."""
        t0 = time.monotonic()
        first_s: float | None = None
        try:
            for chunk in stream:
                if first_s is None and chunk.token is not None:
                    first_s = time.monotonic() - t0
                if chunk.result is not None and first_s is not None:
                    # the tokens it prefilled: a prompt mostly read from the KV cache (a shared system prompt, a
                    # chat's history) made prefill look 6x faster, and cloud-first fallbacks missed their deadline
                    prefilled = prompt_tokens - chunk.result.usage.cached_prompt_tokens
                    self.record(prefilled, first_s, time.monotonic() - t0, len(chunk.result.token_ids))
                yield chunk
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # hands the KV cache back at once when the caller stops early


# Engine arguments -> their [engine] settings, for errors
_ENGINE_SETTING = {"providers": "providers", "intra_op_threads": "threads", "max_sessions": "max_sessions",
                   "cache_tokens": "cache_tokens", "prompt_lookup": "prompt_lookup"}


def check_policy_inputs(parts: Sequence[Policy], est: Estimator) -> None:
    """A policy part whose input a runtime with this estimator cannot give would never escalate, or fail every
    request: ConfigError naming the part (a HybridRuntime at start, ``serve --check``)."""
    for i, part in enumerate(parts):
        where = "policy" if len(parts) == 1 else f"policy.chain[{i}]"
        if part.type_name == "gain" and est.cloud is None:
            raise ConfigError("gain compares the local answer with the cloud's expected accuracy, and this "
                              "estimator has no cloud prior: fit one with `edge-runtime calibrate --cloud-bundle` "
                              "or `edge-runtime explore`", field=f"{where}.type")
        if _reads_context_score(part) and not (est.can_pre_route or getattr(est, "knn", None) is not None):
            raise ConfigError("pre_route needs an estimator that scores a prompt before decoding (a kNN prior, "
                              "from `edge-runtime explore`)", field=f"{where}.type")
        if part.type_name == "early_exit" and getattr(part, "signal", "") == "trajectory" \
                and getattr(part, "confidence_fn", None) is None:
            raise ConfigError("signal 'trajectory' is for replaying recorded runs; a live runtime needs "
                              "mean_prob, min_prob or min_margin", field=f"{where}.signal")
    # two budgets of one chain on one state file: the second's claim failed at every start as "another process",
    # after `serve --check` had passed the config
    holders: dict[str, str] = {}
    for part in parts:
        state_file = getattr(part, "state_file", None)
        if part.type_name != "budget" or state_file is None:
            continue
        field = getattr(part, "_state_field", "policy.state_file")
        key = os.path.realpath(state_file)
        if key in holders:
            raise ConfigError(f"{holders[key]} keeps its spend in {str(state_file)!r} already: give each budget a "
                              "file of its own", field=field)
        holders[key] = field


class HybridRuntime:
    """The embedding API: a local engine, a confidence estimator, a policy and (optionally) a cloud client."""

    def __init__(
        self,
        engine: Engine,
        *,
        policy: Policy | Mapping[str, Any] | None = None,
        estimator: Estimator | None = None,
        cloud: Any = None,
        cost: CostSettings | None = None,
        default_max_new_tokens: int = 256,
        cloud_timeout_s: float | None = None,
    ) -> None:
        """A runtime answering on ``engine`` and escalating to ``cloud`` when ``policy`` says so.

        ``policy``: a Policy or its config mapping (default ``{"type": "threshold", "p": 0.5}``). ``estimator``: the
        confidence estimator (default the built-in ``generic``; one calibrated for another bundle is refused).
        ``cloud``: a :class:`edge_runtime.cloud.CloudClient` (or anything with its ``stream``, and ``list_models``
        for the bridge's prices), or None to answer everything locally. ``cost``: prices and energy for the
        per-answer cost (default :class:`CostSettings`). ``default_max_new_tokens``: when a call gives none (1 to
        65,536).
        ``cloud_timeout_s``: seconds for one escalation, at most 86,400 (None: the cloud client's own ``timeout_s``).
        Every argument is checked here, naming it: a bad one used to fail only at the first escalation.
        """
        from .cloud._settings import MAX_SECONDS

        if cloud_timeout_s is not None and (isinstance(cloud_timeout_s, bool)
                                            or not isinstance(cloud_timeout_s, numbers.Real)
                                            or not 0 < cloud_timeout_s <= MAX_SECONDS):  # also refuses nan
            raise InvalidRequestError(f"must be a number of seconds > 0 and at most {MAX_SECONDS:.0f}, or None, got "
                                      f"{cloud_timeout_s!r:.40}", field="cloud_timeout_s")
        if (isinstance(default_max_new_tokens, bool) or not isinstance(default_max_new_tokens, numbers.Integral)
                or not 1 <= default_max_new_tokens <= MAX_NEW_TOKENS_LIMIT):
            raise InvalidRequestError(f"must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}, got "
                                      f"{default_max_new_tokens!r:.40}", field="default_max_new_tokens")
        if cloud is not None and not callable(getattr(cloud, "stream", None)):
            raise InvalidRequestError(f"must be a CloudClient or None, got {type(cloud).__name__}", field="cloud")
        for name, value, ok, what in (
                ("engine", engine, callable(getattr(engine, "stream_tokens", None)) and hasattr(engine, "bundle_hash"),
                 "an Engine"),
                ("estimator", estimator, estimator is None or isinstance(estimator, Estimator),
                 "an edge_runtime.confidence.Estimator (subclass it) or None"),
                ("cost", cost, cost is None or isinstance(cost, CostSettings), "a CostSettings or None")):
            if not ok:  # each failed later as a bare AttributeError (QA WW)
                raise InvalidRequestError(f"must be {what}, got {type(value).__name__}", field=name)
        self.engine = engine
        self.policy: Policy = policy if isinstance(policy, Policy) else policy_from_config(policy or {"type": "threshold", "p": 0.5})
        self.estimator: Estimator = estimator or load_estimator(None)
        check_bundle_hash(getattr(self.estimator, "bundle_hash", None), engine.bundle_hash,
                          legacy_hash=getattr(engine, "legacy_bundle_hash", None))
        reads_it = any(p.type_name not in ("always", "never", "privacy", "budget") for p in self.policy.parts())
        if reads_it and (elsewhere := fitted_on_another_model(self.estimator, engine.model_name)):
            log.warning("%s", elsewhere)  # a threshold means something else on this model
        self.cloud = cloud
        self.cost = cost or CostSettings()
        # as Python numbers: numpy's (accepted above) are refused by the cloud client at every escalation
        self.default_max_new_tokens = int(default_max_new_tokens)
        self.cloud_timeout_s = None if cloud_timeout_s is None else float(cloud_timeout_s)
        parts = self.policy.parts()
        # only a pre_route reading the runtime's own prompt-only estimate needs it computed (one with its own
        # registered scorer does not)
        self._wants_pre_route = any(_reads_context_score(p) for p in parts)
        self._privacy_parts = [p for p in parts if isinstance(p, Privacy)]  # they check an escalation's draft too
        self._wants_p_cloud = any(p.type_name == "gain" for p in parts)  # with a cloud prior: _check_policy_inputs
        self._has_budget = any(p.type_name == "budget" for p in parts)
        check_policy_inputs(parts, self.estimator)  # first: two budgets on one file are said as such, not as another's
        for part in parts:  # a budget's state file is this runtime's from now (ConfigError if another holds it)
            claim = getattr(part, "claim_state", None)
            if claim is not None:
                claim()
        # load (and fetch once) the sentence encoder the estimator's kNN priors embed prompts with, now: a daemon
        # must fail at start, not report healthy and then fail (or download 90 MB) at its first request
        cloud_prior = self.estimator.cloud if self._wants_p_cloud else None  # read only by a gain policy
        for knn in (getattr(self.estimator, "knn", None), getattr(cloud_prior, "knn", None)):
            if knn is not None:
                try:
                    knn.encoder  # noqa: B018 - the property loads it
                except ModelFetchError as err:  # named as a setting: the daemon's log line is all a user sees
                    raise ConfigError(f"the estimator's sentence encoder: {err}", field="engine.estimator") from err
        # the bridge's own prices for the escalation model (it bills with them): (input, output) USD per million
        self._prices = _PriceState()  # replaced whole (under _price_lock), so a reader always sees one state
        self._price_lock = threading.Lock()
        self._free_warned = False  # a bridge that names no price was warned about
        self._prices_read = threading.Lock()  # held by the request reading them
        self._prior_warned: tuple[str, str] | None = None  # the bridge model a mismatched cloud prior was warned for
        # when to ask the bridge which model it serves (a budget's price reads ask too): to check the gain policy's
        # cloud prior against it, and to learn the longest answer it accepts (see _ask_cloud)
        self._prior_check_due_s = -math.inf if getattr(cloud, "list_models", None) is not None else math.inf
        # the bridge's max_new_tokens_limit for the model escalations go to (None: not read yet, or none said)
        self._cloud_max_new_tokens: int | None = None
        self._prior_lock = threading.Lock()  # for the two above: requests on several threads look at them
        self._pace = _LocalPace()
        self._owned_meter: Any = None  # an energy meter from_settings made for this runtime alone
        self._closed = False
        self._close_lock = threading.Lock()
        # escalations the client skips (circuit open, quota spent) are each in their answer and the metrics; the
        # log says so once a minute, not at every request of an outage
        self._skip_log = Throttle(_SKIPPED_LOG_INTERVAL_S)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | Mapping[str, Any] | Any = None, **engine_kwargs: Any) -> HybridRuntime:
        """From a TOML path, a mapping in the same shape, or a loaded RuntimeSettings.

        ``engine_kwargs`` go to :class:`Engine` and win over the settings (``prompt_lookup=3``,
        ``intra_op_threads=1``, ``energy_meter=None`` to measure nothing, ``verify="full"``)."""
        from .settings import RuntimeSettings, load_runtime_settings

        if isinstance(config, RuntimeSettings):
            settings = config
        elif isinstance(config, Mapping):
            settings = load_runtime_settings(data=config)
        elif config is None or isinstance(config, (str, os.PathLike)):
            settings = load_runtime_settings(config)
        else:
            raise ConfigError(f"must be a TOML file, a mapping or RuntimeSettings, got {type(config).__name__}",
                              field="config")
        return cls.from_settings(settings, **engine_kwargs)

    @classmethod
    def from_settings(cls, settings: Any, **engine_kwargs: Any) -> HybridRuntime:
        """From loaded RuntimeSettings; ``engine_kwargs`` as for :meth:`from_config`."""
        import inspect

        from .models import resolve_bundle
        from .power import EnergyMeter

        # a misspelt one was a bare TypeError from the Engine, after the meter and the cloud client were made
        accepted = set(inspect.signature(Engine.__init__).parameters) - {"self", "bundle"}
        unknown = sorted(set(engine_kwargs) - accepted)
        if unknown:
            raise InvalidRequestError(f"not an Engine argument (it takes {', '.join(sorted(accepted))})",
                                      field=unknown[0])
        e = settings.engine
        # a caller may pass the process meter (the daemon installs one with set_default_meter) instead of a second
        # one, or None for none
        owned = "energy_meter" not in engine_kwargs  # made here: closed with the runtime (its sampler thread)
        meter = engine_kwargs.pop("energy_meter") if not owned else EnergyMeter.from_settings(settings.power)
        cloud = None
        if settings.cloud.address:  # first: a bad [cloud] setting is reported before the model spends its load time
            from .cloud import CloudClient

            try:
                cloud = CloudClient(settings.cloud)
            except BaseException:
                if owned and meter is not None:
                    meter.close()
                raise
        try:
            try:
                engine = Engine(
                    # named: the daemon's log line is all a user sees of the error
                    resolve_bundle(e.bundle, precision=e.precision, field="engine.bundle"),
                    **{"providers": e.provider_list() or None, "intra_op_threads": e.threads,
                       "max_sessions": e.max_sessions, "cache_tokens": e.cache_tokens,
                       "prompt_lookup": e.prompt_lookup, "energy_meter": meter, **engine_kwargs},
                )
            except InvalidRequestError as err:
                # the Engine names its own arguments ("providers[0]"); here they are settings ("engine.providers[0]")
                head, _, rest = (err.field or "").partition("[")
                setting_name = _ENGINE_SETTING.get(head)
                if setting_name is None:
                    raise
                message = str(err).removeprefix(f"{err.field}: ")
                raise ConfigError(message, field=f"engine.{setting_name}" + (f"[{rest}" if rest else "")) from err
            try:
                estimator = load_estimator(e.estimator, bundle_hash=engine.bundle_hash,
                                           legacy_hash=engine.legacy_bundle_hash)
                # the policy checks, and the estimator's sentence encoder, may fail too
                runtime = cls(engine, policy=settings.policy, estimator=estimator, cloud=cloud, cost=settings.cost,
                              default_max_new_tokens=e.max_new_tokens, cloud_timeout_s=settings.cloud.timeout_s)
                runtime._owned_meter = meter if owned else None
                return runtime
            except BaseException as err:
                engine.close()
                if isinstance(err, EstimatorError):
                    raise ConfigError(str(err), field="engine.estimator") from err
                raise
        except BaseException:
            if cloud is not None:
                cloud.close()
            if owned and meter is not None:
                meter.close()
            raise

    def close(self) -> None:
        """Close the cloud client and the engine, and give up a budget's state file (its spend written). Later calls
        raise at once; calls in flight end as the two end theirs: a running escalation's bridge call is cut, and a
        request that still needs the engine (a fallback, or one waiting for a KV cache) raises ``EdgeRuntimeError``.
        Closing again does nothing."""
        with self._close_lock:
            # once: a second close (a ``with`` block around a close() call) released a shared budget's claim a
            # second time, and the budget gave up its state file while another runtime still spent from it
            if self._closed:
                return
            self._closed = True
        if self.cloud is not None:
            self.cloud.close()
        self.engine.close()
        if self._owned_meter is not None:  # each runtime from_settings built left its sampler thread running
            self._owned_meter.close()
        for part in self.policy.parts():  # a runtime built next on the same file (a settings reload) takes it over
            release = getattr(part, "release_state", None)
            if release is not None:
                release()

    def __enter__(self) -> HybridRuntime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- the call --------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str = "auto", params: SamplingParams | None = None,
             cancel: Any = None, request_id: str | None = None, **sampling: Any) -> HybridResult:
        """Answer a conversation: locally, or escalated to the bridge when the policy says so (a failed escalation
        returns the local answer as ``route == "fallback"``). ``model``: ``"auto"`` (the policy decides),
        ``"local"`` or ``"cloud"`` (privacy and budget still hold). Sampling is ``params`` or
        :class:`SamplingParams` fields; without ``max_new_tokens`` it is the runtime's default (``[engine]
        max_new_tokens``, 256), or what is left of the context window when that is less. ``cancel``: a
        ``threading.Event`` or a callable, checked every step and during the bridge call. See :meth:`stream`."""
        result = None
        for chunk in self.stream(messages, model=model, params=params, cancel=cancel, request_id=request_id, **sampling):
            if chunk.result is not None:
                result = chunk.result
        assert result is not None
        return result

    def stream(self, messages: Sequence[Mapping[str, Any]], *, model: str = "auto", params: SamplingParams | None = None,
               cancel: Any = None, request_id: str | None = None, reveal_draft: bool = False,
               deadline_s: float | None = None, on_escalate: Callable[[], None] | None = None,
               on_resume: Callable[[], bool] | None = None,
               fit_max_new_tokens: bool = False, **sampling: Any) -> Iterator[HybridChunk]:
        """Validate now (errors raise before any work), then answer as a stream of chunks.

        ``deadline_s`` (``time.monotonic()`` clock): when the whole answer is due. An
        escalation gets only the time left, less a moment to return the local answer
        (and, when there is none yet, less the time to make it), so a slow bridge ends
        as a ``fallback`` with the local answer rather than as nothing. ``on_escalate``
        is called when the bridge is about to be asked and a whole local answer exists,
        so the engine is not needed again whatever the bridge does (a daemon hands its
        generation slot to the next request). With ``on_resume`` too, ``on_escalate`` is called
        for every escalation, also one with no local answer yet (sent to the cloud first, an
        early exit); if the bridge then fails, ``on_resume()`` is called before the fallback is
        generated and must block until the engine may be used again (False: the caller gave
        up, and the request ends cancelled). ``fit_max_new_tokens``: ``max_new_tokens`` is a
        default the caller did not choose (OpenAI's unset ``max_tokens``), so a long prompt
        gets what is left of the context window instead of an error.
        """
        if self._closed:  # before the policy: it would try the closed client, and log that as a cloud failure
            raise EdgeRuntimeError("the runtime is closed")
        msgs = validate_messages(messages)
        if model not in MODEL_ALIASES:
            raise InvalidRequestError(f"unknown model {model!r} (expected one of {', '.join(MODEL_ALIASES)})", field="model")
        _check_call_arguments(cancel, request_id, deadline_s, on_escalate, on_resume)
        if params is None:
            fit_max_new_tokens = fit_max_new_tokens or "max_new_tokens" not in sampling
            sampling.setdefault("max_new_tokens", self.default_max_new_tokens)
        params = self.engine.sampling_params(params, sampling)
        if not params.truncate_prompt:  # before tokenizing a prompt its length alone shows to be too long
            self.engine.refuse_overlong(messages=msgs, max_new_tokens=0 if fit_max_new_tokens else params.max_new_tokens)
        ids = self.engine.encode(messages=msgs)
        # the local answer gets what fits beside the prompt; the cloud's window is its own, it gets the default
        local_params = params
        room = self.engine.context_length - len(ids)
        if fit_max_new_tokens and not params.truncate_prompt and room < params.max_new_tokens:
            if room <= 0:  # no length was asked for, so "lower max_new_tokens" would be no advice
                raise ContextLengthError(f"the prompt has {len(ids)} tokens and leaves no room for an answer in the "
                                         f"context window of {self.engine.context_length} tokens (shorten the prompt)",
                                         field="messages")
            local_params = dataclasses.replace(params, max_new_tokens=room)
        # the context check happens here too, before any compute
        prompt_ids = (self.engine.fit_messages(msgs, local_params) if local_params.truncate_prompt
                      else self.engine.fit_context(ids, local_params))
        return self._run(msgs, model, params, cancel, request_id or uuid.uuid4().hex, reveal_draft, prompt_ids,
                         _Timing(deadline_s, on_escalate, on_resume), local_params,
                         # not under a budget: it reserves for the length sent, and the bridge's default is unknown
                         cloud_default_length=fit_max_new_tokens and not params.truncate_prompt and not self._has_budget)

    # ---- internals ---------------------------------------------------------------------------

    def _private_match(self, text: str) -> str | None:
        """The name of the first privacy pattern of this runtime's policy that ``text`` matches."""
        for part in self._privacy_parts:
            if (found := part.find([text])) is not None:
                return found[0]
        return None

    def _estimate_cloud_usd(self, msgs: Sequence[Mapping[str, Any]], params: SamplingParams, model: str,
                            draft: str | None = None) -> float:
        """What escalating this request would cost at most (a budget reserves it; the bridge bills the real figure)."""
        return self._estimate(msgs, params, model, draft)[0]

    def _estimate(self, msgs: Sequence[Mapping[str, Any]], params: SamplingParams, model: str,
                  draft: str | None = None) -> tuple[float, tuple[float, float] | None]:
        """:meth:`_estimate_cloud_usd` and the prices it was made at, the escalation's price limit: the bridge's or
        the [cost] table's, whichever reserved more (None: no budget, or a client that cannot list prices)."""
        from .cost import reservation

        # a request for the local model never escalates: it must not wait for the bridge's prices
        state = self._bridge_price_table() if self._has_budget and model != "local" else None
        if model != "local" and not self._has_budget and time.monotonic() >= self._prior_check_due_s:
            self._check_cloud_prior_in_background()
        if state is not None and state.prices is None and state.failed:
            # The bridge's prices were never read (it was down), or not since a bill or a refusal said they were
            # out of date: the device's [cost] table may be a thousandth of what it bills, and the escalations
            # admitted at that guess once it is back spent past the cap. No escalation is admitted against a
            # budget until a read succeeds (retried every few seconds).
            return math.inf, None
        usd, at = reservation(self.cost, self.cloud_model_hint, state.prices if state is not None else None, msgs,
                              params.max_new_tokens, draft=draft)
        return usd, (at if state is not None else None)

    def _reservation(self, settlement: _Settlement, msgs: Sequence[Mapping[str, Any]], params: SamplingParams,
                     model: str, draft: str | None = None) -> float:
        """:meth:`_estimate_cloud_usd`, noting on ``settlement`` the bridge's prices it used: the escalation sends
        them as its price limit, and a bill above it is judged against them (see :meth:`_check_bill`)."""
        usd, settlement.prices = self._estimate(msgs, params, model, draft)
        settlement.priced_at_s = time.monotonic()  # after: a read this estimate waited for is older than it
        return usd

    def _bridge_price_table(self) -> _PriceState | None:
        """The bridge's prices for the model escalations go to, from ListModels; refreshed every 10 minutes.
        None when the client cannot list them."""
        list_models = getattr(self.cloud, "list_models", None)
        if list_models is None:
            return None
        state = self._prices
        if time.monotonic() < state.due_s:
            return state
        if state.answered:
            # A refresh: made in the background, so that no request (holding a generation slot) waits up to
            # _PRICES_TIMEOUT_S on a bridge that hangs; the known prices serve meanwhile
            if self._prices_read.acquire(blocking=False):
                try:
                    threading.Thread(target=self._read_bridge_prices, args=(list_models, state.generation),
                                     daemon=True, name="bridge-prices").start()
                except BaseException:  # no thread (interpreter shutting down): the next request tries again
                    self._prices_read.release()
                    raise
            return state
        if state.due_s > -math.inf:
            # A retry while no read has succeeded: made by the request that finds it due, which waits for it (up
            # to _PRICES_TIMEOUT_S) so that it can escalate if the bridge is back; the others do not wait for it
            if not self._prices_read.acquire(blocking=False):
                return state
        # the first read: wait for the request making it, or concurrent escalations would all reserve a
        # budget at the device's guess and together spend past it
        elif not self._prices_read.acquire(timeout=2 * _PRICES_TIMEOUT_S):
            return dataclasses.replace(state, due_s=0.0)  # read by another, and not in time: unknown
        state = self._prices
        if time.monotonic() < state.due_s:  # read while this request waited
            self._prices_read.release()
            return state
        self._read_bridge_prices(list_models, state.generation)
        return self._prices

    def _list_models(self, list_models: Callable[..., Any]) -> Any:
        """The bridge's models, read briefly and outside the client's circuit breaker: the runtime's own reads (prices,
        limits, the model served) failing in an outage must not open it, nor take a half-open circuit's probe from
        the escalation that would test the bridge (see ``CloudClient.list_models``)."""
        from .cloud import CloudClient

        if not isinstance(self.cloud, CloudClient):  # a stand-in may not take circuit=
            return list_models(timeout_s=_PRICES_TIMEOUT_S)
        if self.cloud.circuit.state == "open":
            # the escalations are skipped now anyway; a read would only make the request waiting for it (a first
            # price read) wait up to _PRICES_TIMEOUT_S on a host that hangs. Half-open: read, without the probe
            raise CircuitOpenError("the circuit is open: the bridge's models are read once it half-opens",
                                   code="CIRCUIT_OPEN")
        return list_models(timeout_s=_PRICES_TIMEOUT_S, circuit=False)

    def _read_bridge_prices(self, list_models: Callable[..., Any], generation: int) -> None:
        """Read the bridge's prices (briefly: a bridge that is down must not hold anyone); release the read lock.
        A read that began before the prices were found out of date (``generation``) does not count."""
        try:
            try:
                models = self._list_models(list_models)
            except Exception as err:  # a bug too: it must not leave the lock held (every later read would be skipped)
                if isinstance(err, CloudError):  # the bridge is down: its escalations fall back anyway
                    # said once (retries every few seconds are debug): with no prices known, a budget keeps every
                    # escalation local, which an operator would otherwise see nowhere
                    unknown = not self._prices.answered and not self._prices.failed
                    (log.warning if unknown and self._has_budget else log.debug)(
                        "cannot read the bridge's prices (%s)%s", err,
                        ": escalations against the budget are answered on the device (reason budget_prices_unknown) "
                        "until they can be" if unknown and self._has_budget else "")
                else:
                    log.exception("reading the bridge's prices failed")
                with self._price_lock:
                    if self._prices.generation == generation:
                        self._prices = dataclasses.replace(self._prices, due_s=time.monotonic() + _PRICES_RETRY_S)
                return
            info = self._served_model(models)
            if (info is not None and self._has_budget and not self._free_warned
                    and info.usd_per_million_input_tokens == 0 and info.usd_per_million_output_tokens == 0):
                # it bills $0, and a budget counts what is billed: its cap then limits nothing
                self._free_warned = True
                log.warning("the bridge names no price for %r: its bills are $0, and the budget counts them as $0, "
                            "so it limits nothing; set the alias' usd_per_million_input_tokens and "
                            "usd_per_million_output_tokens at the bridge", info.alias)
            with self._price_lock:
                if self._prices.generation == generation:
                    prices = ((info.usd_per_million_input_tokens, info.usd_per_million_output_tokens)
                              if info is not None else self._prices.prices)
                    if prices is not None and not all(math.isfinite(p) and p >= 0 for p in prices):
                        # a bridge that does not keep the contract: a NaN made every reservation NaN, which a budget
                        # admits; the [cost] table stands in
                        log.warning("the bridge listed prices %r for its model: not prices; using the [cost] table",
                                    prices)
                        prices = None
                    self._prices = _PriceState.known(prices, generation)
            if info is not None:
                try:
                    self._note_served_model(info)
                except Exception:  # a bug in a warning must not fail the request reading the prices
                    log.exception("checking the cloud prior against the bridge's model failed")
        finally:
            self._prices_read.release()

    def _check_bill(self, billed_usd: float, settlement: _Settlement, request_id: str) -> None:
        """A bill above what its escalation reserved: the bridge's prices went up since they were read (a new price
        or model behind the alias; a bridge older than the price limit runs such a call). Until the next refresh,
        up to 10 minutes, a budget reserved at the old prices and concurrent escalations together spent past its
        cap; now the next admission reads them again first, and the others wait for that read, as at the first
        one (no escalation is admitted against a budget while it fails)."""
        reserved = settlement.ctx.estimated_cloud_usd if settlement.ctx is not None else math.inf
        if (not self._has_budget or billed_usd <= reserved + 1e-12
                or self._prices.read_s > settlement.priced_at_s):  # read since it was reserved: that stands
            return
        log.warning("%s: the bridge billed $%.8g for an escalation that reserved $%.8g at its last known prices: "
                    "reading its prices again before the next escalation", request_id, billed_usd, reserved)
        self._prices_outdated(None)

    def _prices_outdated(self, prices: tuple[float, float] | None) -> None:
        """Forget the bridge's prices, as out of date (or take ``prices``, which it sent with a refusal); a read
        already under way then does not count."""
        with self._price_lock:
            generation = self._prices.generation + 1
            self._prices = _PriceState(generation=generation) if prices is None else _PriceState.known(prices, generation)

    def _served_model(self, models: Sequence[Any]) -> Any:
        """The ListModels entry of the model escalations go to (the configured alias, else the default)."""
        alias = getattr(getattr(self.cloud, "settings", None), "model", "")
        return next((m for m in models if (m.alias == alias if alias else m.is_default)), None)

    def _check_cloud_prior_in_background(self) -> None:
        """Ask the bridge which model it serves and check the cloud prior against it, off the request's path."""
        with self._prior_lock:
            if time.monotonic() < self._prior_check_due_s:  # another request started it
                return
            self._prior_check_due_s = time.monotonic() + _PRICES_REFRESH_S

        def read() -> None:
            try:
                info = self._served_model(self._list_models(self.cloud.list_models))
                if info is not None:
                    self._note_served_model(info)
            except Exception as err:  # a bug too: logged, never the thread's traceback on stderr
                if isinstance(err, CloudError):  # down: its escalations fall back anyway; try again later
                    log.debug("cannot ask the bridge which model it serves: %s", err)
                    retry_s = _PRICES_RETRY_S
                else:  # a bug: logged once per refresh, not every few seconds
                    log.exception("checking the cloud prior against the bridge's model failed")
                    retry_s = _PRICES_REFRESH_S
                with self._prior_lock:
                    self._prior_check_due_s = time.monotonic() + retry_s

        threading.Thread(target=read, daemon=True, name="bridge-models").start()

    def _note_served_model(self, info: Any) -> None:
        """What the device learns from the bridge's entry for its model: the longest answer it accepts, and whether
        the gain policy's cloud prior describes it."""
        limit = getattr(info, "max_new_tokens_limit", 0)
        self._cloud_max_new_tokens = limit if isinstance(limit, int) and limit > 0 else None
        self._check_cloud_prior(info)

    def _check_cloud_prior(self, info: Any) -> None:
        """Warn (once per bridge model) when the gain policy's cloud prior was fitted for another cloud model: it
        routes on that model's accuracy profile, and nothing else would show it."""
        fitted = (getattr(self.estimator, "meta", None) or {}).get("cloud_model")
        if not self._wants_p_cloud or not isinstance(fitted, Mapping):
            return  # no gain policy, or a prior that does not say what it describes (fitted before it was recorded)
        model, revision = str(fitted.get("model") or ""), str(fitted.get("revision") or "")
        # A prior fitted now records the whole bundle's hash and its files' beside it (``files_revision``; the same
        # two when the bridge was older); one fitted before records the files' hash alone. A bridge reports the files'
        # hash (``revision``) and, since, the whole bundle's. Whole against whole where both sides have it (a changed
        # chat template is another model), else files against files.
        files = str(fitted.get("files_revision") or "")
        fitted_whole = revision if files and revision != files else ""
        fitted_files = files or revision
        bridge_whole, bridge_files = str(getattr(info, "bundle_revision", "") or ""), str(info.revision or "")
        served = (str(info.model), bridge_whole or bridge_files)
        if fitted_whole and bridge_whole:
            same = fitted_whole == bridge_whole
        else:  # (a record without files_revision holding a whole hash: matched against the bridge's whole one)
            same = not fitted_files or not bridge_files or fitted_files in (bridge_files, bridge_whole)
        if model == served[0] and same:
            return
        with self._prior_lock:
            warned, self._prior_warned = self._prior_warned, served
        if warned != served:
            log.warning("the estimator's cloud prior, which the gain policy routes on, was fitted for %s%s; the "
                        "bridge now answers with %s%s: refit it (`edge-runtime explore`, or `edge-runtime calibrate "
                        "--cloud-bundle`) or the gain figures describe another model", log_text(model, 200),
                        f" (revision {revision[:12]})" if revision else "", log_text(served[0], 200),
                        f" (revision {served[1][:12]})" if served[1] else "")

    @property
    def cloud_model_hint(self) -> str:
        return getattr(getattr(self.cloud, "settings", None), "model", "") or "*"

    def _pre_route_score(self, prompt: str, prompt_tokens: int) -> float | None:
        est = self.estimator
        if est.can_pre_route:
            return est.pre_p_correct(prompt, prompt_tokens)
        knn = getattr(est, "knn", None)
        return knn.prior(prompt) if knn is not None else None

    def _p_correct(self, result: GenerationResult, msgs: Sequence[Mapping[str, Any]], spent: list[EnergyReport]) -> float:
        """The estimator's probability that the local answer is right; NaN when it gave no usable number (the
        policies read NaN as no opinion, and the result reports it as null).

        An estimator that runs the model (``needs_engine``: the self-check prefills the whole conversation
        again) is metered like a generation, into ``spent``: the device paid for it on this request's behalf.
        An answer with no text (a stop string matching at once, an eos first) is no answer: 0. The estimators read
        its token features as certain ones and scored it ~0.7, above a real answer, and it was kept local (QA UU).
        """
        if no_answer(result.text):
            return 0.0
        signals = signals_from_result(result, messages=msgs)
        meter = self.engine.energy_meter if self.estimator.needs_engine else None
        window = meter.start() if meter is not None else None
        try:
            p = float(self.estimator.p_correct(signals, engine=self.engine, messages=msgs))
        except EdgeRuntimeError:  # ours (the engine closed under a self-check): the request's own error
            raise
        except MemoryError as err:  # a self-check's prefill: the request's error, as for generation (503, not 500)
            raise OutOfMemoryError("not enough memory for the confidence estimator's run of the model") from err
        except Exception:  # a custom estimator's bug (or None): no estimate, and the local answer still comes back
            log.exception("the estimator %s failed: treated as no estimate", getattr(self.estimator, "name", "?"))
            return math.nan
        finally:
            if window is not None:
                window.stop()
                spent.append(window.to_report())
        if not 0.0 <= p <= 1.0:  # (nan too) a custom estimator's: a probability is what the policies and the bridge take
            log.warning("the estimator %s gave p_correct %s: treated as no estimate", self.estimator.name, p)
            return math.nan
        return p

    def _local_stream(self, prompt_ids: list[int], params: SamplingParams, cancel: Any, stop: threading.Event,
                      ) -> Iterator[Any]:
        # the prompt was tokenized and checked against the context window once, in stream()
        return self._pace.watch(self.engine.stream_tokens(prompt_ids, params, cancel=lambda: stop.is_set() or _is_cancelled(cancel),
                                                          prompt_nll=self.estimator.needs_prompt_nll), len(prompt_ids))

    def _run(self, msgs: list[dict[str, str]], model: str, params: SamplingParams, cancel: Any, request_id: str,
             reveal_draft: bool, prompt_ids: list[int], timing: _Timing,
             local_params: SamplingParams | None = None, *, cloud_default_length: bool = False) -> Iterator[HybridChunk]:
        settlement = _Settlement(self.policy)
        try:
            yield from self._answer(msgs, model, params, cancel, request_id, reveal_draft, prompt_ids, timing, settlement,
                                    local_params or params, cloud_default_length=cloud_default_length)
        finally:  # a caller that stops reading (closes the stream) still settles what a budget reserved
            settlement.close()

    def _answer(self, msgs: list[dict[str, str]], model: str, params: SamplingParams, cancel: Any, request_id: str,
                reveal_draft: bool, prompt_ids: list[int], timing: _Timing, settlement: _Settlement,
                local_params: SamplingParams, *, cloud_default_length: bool = False) -> Iterator[HybridChunk]:
        """``params`` for the cloud (and its reservation), ``local_params`` for the local answer (see :meth:`stream`).
        ``cloud_default_length``: the caller chose no ``max_new_tokens``, so the bridge is asked for its default,
        which it fits to its model's window (an explicit default was refused for a long prompt or over its limit)."""
        t0 = time.perf_counter()
        ctx = RequestContext(messages=msgs, request_id=request_id,
                             estimated_cloud_usd=self._reservation(settlement, msgs, params, model))
        settlement.ctx = ctx
        if self._wants_pre_route and model == "auto":
            ctx = dataclasses.replace(ctx, pre_route_p_correct=_score_or_none(
                "the prompt-only estimate", self._pre_route_score, ctx.prompt_text, len(prompt_ids)))
        if self._wants_p_cloud and model == "auto":
            assert self.estimator.cloud is not None
            p_cloud = _score_or_none("the cloud's estimate", self.estimator.cloud.p_cloud, ctx.prompt_text, len(prompt_ids))
            ctx = dataclasses.replace(ctx, features={} if p_cloud is None else {"p_cloud": p_cloud})
        if model == "local":
            decision = Decision("local", "requested_local", "the request asked for the local model", policy="request")
        elif model == "cloud":
            # asked for by the request, but the gates still hold: privacy keeps a card number on the device,
            # a budget caps the spend
            decision = self.policy.admit(ctx, Decision("cloud", "requested_cloud", "the request asked for the cloud model",
                                                       policy="request"))
        else:
            decision = self.policy.before(ctx)

        locals_: list[GenerationResult] = []  # every local run (an early exit, then maybe a full fallback answer)
        estimator_energy: list[EnergyReport] = []  # what an estimator that runs the model spent
        held: list[HybridChunk] = []  # local text not shown yet
        shown = False  # local text already on the caller's screen
        early_exit = False
        reserved_without_draft = False  # an escalation admitted before the answer was whole sends no draft
        p_correct: float | None = None

        # 1. decode locally unless escalating straight away
        if decision.action != "cloud":
            # text that can no longer be withdrawn: with no bridge, no cloud answer can replace it
            live = reveal_draft or decision.action in ("local", "local_forced") or self.cloud is None
            # an early exit would cut the answer for an escalation that cannot happen, and decode it again
            watch = model == "auto" and decision.action == "continue" and self.cloud is not None
            stop = threading.Event()
            tokens: list[TokenInfo] = []
            local = self._local_stream(prompt_ids, local_params, cancel, stop)
            for chunk in local:
                if chunk.result is not None:
                    locals_.append(chunk.result)
                    break
                out = HybridChunk("text", chunk.text, chunk.token, tokens_shown=chunk.tokens_shown)
                if live:
                    shown = shown or bool(chunk.text)
                    yield out
                else:
                    held.append(out)
                if watch and chunk.token is not None and not stop.is_set():
                    tokens.append(chunk.token)
                    d = self.policy.during(ctx, tokens)
                    if d.action == "cloud":
                        decision, early_exit = d, True
                        # the early-exit signal is not a probability of being right: no estimate is sent or reported
                        stop.set()  # the engine ends the generation at its next step
                    elif d.action == "local_forced":
                        # a gate refused the escalation the early exit wanted (a budget that requests in flight
                        # filled since the check before decoding): the answer is finished here and says so. It was
                        # dropped: the answer came back "local", "no part of the policy asked for the cloud", and
                        # was not counted in edge_runtime_forced_local_total (replay counts it as forced)
                        decision, watch = d, False
            local.close()  # hands the KV cache back to the engine's pool now, not when the generator is collected
            # the escalation was admitted (and a budget reserved) during decoding, for the prompt alone
            reserved_without_draft = early_exit
            if early_exit and locals_ and locals_[-1].finish_reason != "cancelled":
                # the check failed on the token that ended the answer: it is whole, so it stays the fallback
                # (decoding it again would only repeat it)
                early_exit = False
            # the caller cancelled before the answer was whole: a score of the cut answer would be reported as if it
            # were one (and could route it; a self-check would prefill it again for nobody), and an escalation would
            # have nobody to answer
            cut_by_caller = locals_[-1].finish_reason == "cancelled" and _is_cancelled(cancel)
            if decision.action == "continue" and cut_by_caller:
                decision = Decision("local_forced", "cancelled", "the caller cancelled the request before its answer was whole",
                                    policy=decision.policy)
            elif decision.action == "continue":
                p_correct = self._p_correct(locals_[-1], msgs, estimator_energy)
                # an escalation admitted now sends the draft along: a budget reserves for it too
                ctx = settlement.ctx = dataclasses.replace(ctx, estimated_cloud_usd=self._reservation(
                    settlement, msgs, params, model, draft=locals_[-1].text))
                decision = self.policy.after(ctx, p_correct)
            elif p_correct is None and not early_exit and not cut_by_caller:
                p_correct = self._p_correct(locals_[-1], msgs, estimator_energy)

        # 2. escalate, or release the local answer
        handed_over = False  # the engine was handed on with no whole local answer: the fallback must get it back
        cloud_result = None
        cloud_error: str | None = None
        cloud_error_type: str | None = None
        asked = False  # whether the escalation used the network (its energy counts even when it failed)
        maybe_billed = False  # a failed or cancelled escalation the bridge may have billed, for an amount unknown here
        failed_bill: CloudBill | None = None  # what the bridge said it billed for an escalation that failed
        failed_cloud_ms = 0.0  # the wait for an escalation that failed
        route: Route
        if decision.action == "cloud" and _is_cancelled(cancel) and not timing.out_of_time():
            # the caller has gone (a daemon client disconnected): spend no cloud money on an answer nobody reads
            route, decision = "local_forced", Decision("local_forced", "cancelled", "the caller cancelled the request before escalation",
                                                       policy=decision.policy, value=decision.value, threshold=decision.threshold)
            settlement.settle(0.0)  # release what a budget reserved for the escalation
        elif decision.action == "cloud" and self.cloud is None:
            route, decision = "local_forced", Decision("local_forced", "cloud_not_configured",
                                                       "escalation wanted but no cloud bridge is configured",
                                                       policy=decision.policy, value=decision.value, threshold=decision.threshold)
            settlement.settle(0.0)
        elif decision.action == "cloud":
            progress = _CloudProgress()
            try:
                whole_local = bool(locals_) and not early_exit
                hand_over = timing.on_escalate is not None and (whole_local or timing.on_resume is not None)
                # with no whole local answer yet, a failed escalation must leave the time to make one
                local_s = self._pace.estimate_s(len(prompt_ids), local_params.max_new_tokens) if not whole_local else 0.0
                # and, with the engine handed on, to wait for it first: about one other generation, taken as long
                wait_s = local_s if hand_over and not whole_local and local_s is not None else 0.0
                timeout_s = timing.cloud_timeout_s(self.cloud_timeout_s, local_s, wait_s)
                if hand_over:
                    # the engine is done with this request whatever the bridge does: a failure returns the local
                    # answer already made; when there is none, on_resume gets the engine back for the fallback
                    timing.on_escalate()
                    handed_over = not whole_local
                asked = True  # from here bytes may go out (unless an open circuit refuses the call first)
                settlement.unsettled_usd = ctx.estimated_cloud_usd  # if the caller leaves now, the call may be billed
                t_cloud = time.perf_counter()
                cloud_result, cloud_chunks = self._ask_cloud(msgs, params, locals_, p_correct, decision, request_id,
                                                             cancel, timeout_s, timing,
                                                             early_exit or reserved_without_draft, progress,
                                                             settlement.prices, default_length=cloud_default_length)
                # a bill that is no amount (the client read a NaN or a negative one): counted as one that may be
                # what was reserved, and said to be unknown
                billed_usd = ctx.estimated_cloud_usd if cloud_result.cost_unknown else cloud_result.cost_usd
                maybe_billed = cloud_result.cost_unknown
                settlement.unsettled_usd = billed_usd
                self._check_bill(billed_usd, settlement, request_id)
                if not cloud_result.text.strip():
                    # an empty answer is no answer: the local one is returned, never nothing (the call's bill and
                    # usage stand, in the result too)
                    settlement.settle(billed_usd)
                    cloud_error, cloud_error_type = "the bridge answered with no text", "EmptyAnswer"
                    log.warning("%s: escalation failed, answering locally: %s", request_id, cloud_error)
                    route = "fallback"
                else:
                    if reveal_draft and shown:
                        yield HybridChunk("withdraw")
                        shown = False
                    for c in cloud_chunks:
                        yield c
                    route = "cloud"
                    settlement.settle(billed_usd)
            except _Cancelled:
                # the caller left while the bridge was answering: the call was cancelled, so was the bridge's
                # generation; what it generated until then is billed and unknown here, so a budget keeps the
                # amount it reserved rather than counting the call as free
                maybe_billed = progress.accepted or progress.text  # one the bridge never took was never billed
                settlement.settle(ctx.estimated_cloud_usd if maybe_billed else 0.0)
                failed_cloud_ms = (time.perf_counter() - t_cloud) * 1000.0  # the radio was on meanwhile
                route, decision = "local_forced", Decision("local_forced", "cancelled", "the caller cancelled the request during escalation",
                                                           policy=decision.policy, value=decision.value, threshold=decision.threshold)
            except CloudError as err:
                # an answer that was generated and then failed may be billed: one too large for this client (the
                # bridge billed it whole), a stream that broke after its first words, a deadline that cut a call the
                # bridge had accepted (an upstream bills what it generated), a call the bridge had taken when the
                # connection broke or the bridge stopped. A refusal, or an upstream that failed before answering
                # (down, a wrong key), cost nothing.
                billed = (isinstance(err, CloudResponseTooLargeError) or progress.text or err.lost
                          or (isinstance(err, CloudTimeoutError) and (progress.accepted or err.bridge_accepted)))
                # the bridge said what it billed (an answer it could not use, a stream its upstream broke off)
                failed_bill = err.billed
                if failed_bill is not None:
                    self._check_bill(failed_bill.cost_usd, settlement, request_id)
                    settlement.settle(failed_bill.cost_usd)
                else:
                    settlement.settle(ctx.estimated_cloud_usd if billed else 0.0)
                maybe_billed = bool(billed) and failed_bill is None
                if isinstance(err, CloudPriceError):  # refused before generating: its prices are the bridge's now
                    log.warning("%s: the bridge's prices rose since they were read: %s", request_id, err)
                    self._prices_outdated(err.prices)
                if asked:
                    failed_cloud_ms = (time.perf_counter() - t_cloud) * 1000.0
                asked = asked and not err.skipped  # refused on the device (circuit open, quota spent): no radio
                cloud_error, cloud_error_type = f"{type(err).__name__}: {err}", type(err).__name__
                left_out = self._skip_log.admit() if err.skipped else 0
                if left_out is None:
                    log.debug("%s: escalation skipped, answering locally: %s", request_id, log_text(cloud_error))
                else:
                    log.warning("%s: escalation %s, answering locally: %s%s", request_id,
                                "skipped" if err.skipped else "failed", log_text(cloud_error),
                                f" ({left_out} more skipped since the last such line)" if left_out else "")
                route = "fallback"
        else:
            route = "local" if decision.action == "local" else "local_forced"

        if handed_over and route != "cloud" and decision.reason != "cancelled" and not (
                timing.on_resume is not None and timing.on_resume()):
            # the engine was handed on and the caller gave up before it came back: no fallback to make
            route, decision = "local_forced", Decision("local_forced", "cancelled", "the caller cancelled the request "
                                                       "while it waited for the engine after a failed escalation",
                                                       policy=decision.policy)
        if route != "cloud" and not (decision.reason == "cancelled" and (not locals_ or early_exit)):
            if not locals_ or early_exit:
                # the local answer was skipped or cut short: produce a whole one now (nothing the user asked for is lost)
                if shown:
                    yield HybridChunk("withdraw")
                held = []
                fallback = self._local_stream(prompt_ids, local_params, cancel, threading.Event())
                try:
                    for chunk in fallback:
                        if chunk.result is not None:
                            locals_.append(chunk.result)
                            break
                        yield HybridChunk("text", chunk.text, chunk.token, tokens_shown=chunk.tokens_shown)
                finally:
                    # its KV cache back to the pool now, as for the first answer: a self-check below needs one
                    fallback.close()
                if locals_[-1].finish_reason == "cancelled":
                    # a cut answer is never scored (and a self-check would run the model for a caller who left)
                    p_correct = None
                elif p_correct is None or early_exit:
                    p_correct = self._p_correct(locals_[-1], msgs, estimator_energy)
            else:
                yield from held
        yield HybridChunk("done", result=self._result(msgs, request_id, route, decision, p_correct, locals_, cloud_result,
                                                      cloud_error, early_exit, t0, asked, failed_cloud_ms, estimator_energy,
                                                      maybe_billed=maybe_billed, cloud_error_type=cloud_error_type,
                                                      failed_bill=failed_bill))

    def _ask_cloud(self, msgs: list[dict[str, str]], params: SamplingParams, locals_: list[GenerationResult],
                   p_correct: float | None, decision: Decision, request_id: str, cancel: Any,
                   timeout_s: float | None, timing: _Timing, no_draft: bool = False,
                   progress: _CloudProgress | None = None,
                   max_prices: tuple[float, float] | None = None, *,
                   default_length: bool = False) -> tuple[Any, list[HybridChunk]]:
        """Call the bridge; return its result and its text chunks.

        The text is collected before anything is shown: a call that fails half-way must not leave
        words on the caller's screen that the local fallback then contradicts. A caller that
        cancels stops the call (and with it the bridge's generation) at the next chunk.
        """
        from .cloud import Escalation

        # an early exit's text is no draft: cut short, and a budget reserved for the prompt alone
        draft = locals_[-1].text if locals_ and not no_draft else ""
        if draft and (pattern := self._private_match(draft)) is not None:
            # the prompt passed the privacy gate, but the local answer holds what must not leave the device (a phone
            # number written out from words): the escalation goes without it
            log.info("%s: the local draft matches privacy pattern %s: not sent with the escalation", request_id,
                     pattern)
            draft = ""
        progress = progress or _CloudProgress()
        cap = self._cloud_max_new_tokens
        if cap is not None and params.max_new_tokens > cap:
            # the bridge refuses a longer request outright: every such escalation fell back. Its answer is cut at
            # the bridge's limit instead, and says so (finish_reason "length")
            params = dataclasses.replace(params, max_new_tokens=cap)
        escalation = Escalation(draft_answer=draft, p_correct=_finite_or_none(p_correct), reason=decision.reason,
                                policy=self.policy.describe(),
                                local_model=self.engine.model_name)
        chunks: list[HybridChunk] = []
        result = None
        # the client watches `cancel` while it waits for the bridge: a caller that leaves stops the bridge's generation
        # at once, not at its next chunk
        # the prices the budget reserved at go along as the call's limit: a bridge priced higher since refuses it
        # before generating (a fake or older client takes no such argument: it is passed only when there is one)
        limit: dict[str, Any] = {"max_prices": max_prices} if max_prices is not None else {}
        if default_length:  # (likewise: only when there is one)
            limit["default_length"] = True
        stream = self.cloud.stream(msgs, params=params, escalation=escalation, timeout_s=timeout_s, request_id=request_id,
                                   cancel=lambda: _is_cancelled(cancel) and not timing.out_of_time(), **limit)
        try:
            for c in stream:
                progress.accepted = True  # the bridge answered with a message: it had taken the call
                if timing.out_of_time():
                    raise CloudTimeoutError("the bridge had not finished when the request's deadline came")
                if _is_cancelled(cancel):
                    raise _Cancelled
                if c.result is not None:
                    result = c.result
                elif c.text:
                    progress.text = True
                    chunks.append(HybridChunk("text", c.text))
        except CloudCancelledError as err:
            progress.accepted = progress.accepted or err.bridge_accepted
            raise _Cancelled from err
        finally:
            stream.close()  # cancels the call if it is still running
        if result is None:
            raise CloudError("the bridge's stream ended without a result")
        return result, chunks

    def _result(self, msgs: list[dict[str, str]], request_id: str, route: Route, decision: Decision, p_correct: float | None,
                locals_: list[GenerationResult], cloud: Any, cloud_error: str | None, early_exit: bool, t0: float,
                asked: bool = False, failed_cloud_ms: float = 0.0,
                estimator_energy: Sequence[EnergyReport] = (), *, maybe_billed: bool = False,
                cloud_error_type: str | None = None, failed_bill: CloudBill | None = None) -> HybridResult:
        final_local = locals_[-1] if locals_ else None
        energies = [r.energy for r in locals_ if r.energy is not None] + list(estimator_energy)
        local_j = sum(e.joules for e in energies)
        estimator_j = sum(e.joules for e in estimator_energy)
        net_j = wait_j = 0.0
        # an escalation that answered, failed or was cancelled used the radio; an open circuit or no time left did not
        if cloud is not None or asked:
            # request: the messages and the draft plus ~256 bytes of framing; response: the answer plus ~128
            out_bytes = 256 + len(json.dumps(msgs).encode()) + (len(final_local.text.encode()) if final_local else 0)
            in_bytes = 128 + (len(cloud.text.encode()) if cloud is not None else 0)
            net_j = network_energy_j(self.cost, out_bytes, in_bytes)
            # and the device kept drawing its idle power while it waited
            wait_j = wait_energy_j(self.engine.energy_meter, cloud.latency_ms if cloud is not None else failed_cloud_ms)
        energy: dict[str, Any] = {
            "joules": round(local_j, 6),
            # every part's source: a window whose sensor failed fell back to the estimate, and the sum must not
            # carry the sensor's name alone ("hwmon:ina226+estimate:generic")
            "source": "+".join(dict.fromkeys(e.source for e in energies)) if energies else "none",
            "estimated": any(e.estimated for e in energies) if energies else True,
            # unknown (None) when any part's CPU times could not be read: 0.0 claimed the process drew nothing
            "process_joules": round(sum(e.process_joules for e in energies), 6)  # type: ignore[misc]
            if energies and all(e.process_joules is not None for e in energies) else None,
            "seconds": round(sum(e.seconds for e in energies), 6),
            "network_joules": round(net_j, 6),
            "network_estimated": True,
            # the device's idle draw while it waited for the cloud (its profile's idle watts): always an estimate
            "wait_joules": round(wait_j, 6),
            # included in joules: the estimator's own run of the model (the self-check), 0 for the others
            "estimator_joules": round(estimator_j, 6),
        }
        # a failed escalation's bill, when the bridge said it billed one, counts as an answered one's does
        bill = (CloudBill(cloud.cost_usd, cloud.prompt_tokens, cloud.completion_tokens) if cloud is not None
                else failed_bill or CloudBill(0.0, 0, 0))
        cloud_usd = float(bill.cost_usd)
        device_usd = device_energy_usd(self.cost, local_j + net_j + wait_j)
        cost: Cost = {"cloud_usd": cloud_usd, "device_energy_usd": device_usd, "network_energy_j": round(net_j, 6),
                "total_usd": cloud_usd + device_usd,
                # an escalation that failed or was cancelled after the bridge took it: it may have been billed for
                # what was generated, which the device never learns (cloud_usd counts only bills it received; a
                # budget keeps the reservation; the bridge's access log has the figure)
                "cloud_usd_unknown": maybe_billed,
                # priced from the energy above: estimated when any of it is (the network's and the wait's always are)
                "device_energy_estimated": bool(energy["estimated"] or net_j > 0 or wait_j > 0)}
        usage = {
            "local": {"prompt_tokens": sum(r.usage.prompt_tokens for r in locals_),
                      "completion_tokens": sum(r.usage.completion_tokens for r in locals_)},
            "cloud": {"prompt_tokens": bill.prompt_tokens, "completion_tokens": bill.completion_tokens},
        }
        latency = {
            "local_prefill_ms": round(sum(r.timings.prefill_ms for r in locals_), 3),
            "local_decode_ms": round(sum(r.timings.decode_ms for r in locals_), 3),
            # a failed escalation's whole wait (how it divides between bridge and network is not known)
            "cloud_ms": round(cloud.server_timings.total_ms if cloud is not None else failed_cloud_ms, 3),
            "network_ms": round(cloud.latency_ms - cloud.server_timings.total_ms, 3) if cloud is not None else 0.0,
            "total_ms": round((time.perf_counter() - t0) * 1000.0, 3),
        }
        if route == "cloud":
            text, model, finish, tokens = cloud.text, cloud.model, cloud.finish_reason, []
        elif final_local is None:  # cancelled before any local answer existed
            text, model, finish, tokens = "", self.engine.model_name, "cancelled", []
        else:
            text, model, finish, tokens = final_local.text, final_local.model, final_local.finish_reason, final_local.tokens
            # the answer's per-token log-probabilities are those of its text: not of an eos or a cut stop string
            tokens = tokens[:final_local.text_tokens] if final_local.text_tokens is not None else tokens
        accepted = sum(r.usage.accepted_draft_tokens for r in locals_)
        reason = decision.reason if route != "fallback" else "cloud_error"
        detail = decision.detail if route != "fallback" else f"{decision.reason}: escalation failed ({cloud_error}); local answer returned"
        return HybridResult(
            request_id=request_id, text=text, route=route, reason=reason, detail=detail,
            p_correct=_finite_or_none(p_correct),
            threshold=decision.threshold, policy=self.policy.describe(), model=model, finish_reason=finish,
            draft=(final_local.text if final_local and not early_exit else None) if route == "cloud" else None,
            tokens=list(tokens), usage=usage, latency_ms=latency, energy=energy, cost=cost, cloud_error=cloud_error,
            cloud_error_type=cloud_error_type,
            predictions={"accepted": accepted, "rejected": sum(r.usage.draft_tokens for r in locals_) - accepted},
            cached_prompt_tokens=sum(r.usage.cached_prompt_tokens for r in locals_),
        )
