"""The cost model: cloud money, device energy in money, and the network energy of an escalation.

One documented settings section (``[cost]`` in the daemon's config, the same
defaults in the explorer). Every default below is an *example* with where it
came from; set your own.

- Cloud price per million input / output tokens, per model: the bridge
  computes the USD of every call from its own price table and reports it; this
  table is used only when a run has no bridge behind it (the explorer's local
  stand-in). Default example: USD 0.15 input / 0.60 output per million tokens,
  the list price of OpenAI's gpt-4o-mini at its launch (July 2024), a typical
  small hosted model; taken for this project on 2026-11-29.
- Electricity: USD 0.30 per kWh, an example household tariff (2026-11-29).
- Network energy of one escalation = bytes × J/KB + a per-request radio cost.
  Source: Huang et al., "A Close Examination of Performance and Power
  Characteristics of 4G LTE Networks", MobiSys 2012, whose power model gives
  per-throughput power for Wi-Fi and LTE and a long high-power LTE "tail"
  after each transfer (their abstract: LTE up to 23x less power efficient than
  Wi-Fi, the tail a key contributor). The figures used here are approximate
  values from that model as we recall it, not re-checked against the paper in
  this repository: about 280/140 mW per Mbps up/down on Wi-Fi and 440/50 on
  LTE, i.e. roughly 1.7 mJ/KB (Wi-Fi) and 2.0 mJ/KB (LTE) averaged over both
  directions (1 mW/Mbps is 8 µJ per KB); an LTE tail of about 11.6 s at about
  1 W, i.e. roughly 12 J per isolated escalation on cellular, against about
  0.03 J on Wi-Fi. On cellular the radio tail dominates the device-side cost
  of escalating. Measure your own device and set these values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .config import documented, is_finite, setting, shown
from .errors import ConfigError

__all__ = ["CostSettings", "DEFAULT_PRICES", "NETWORKS", "price_usd", "reservation", "reservation_usd", "table_prices",
           "device_energy_usd",
           "network_energy_j"]

# USD per million tokens: {"input": ..., "output": ...}; "*" applies to any model not listed
DEFAULT_PRICES: dict[str, dict[str, float]] = {"*": {"input": 0.15, "output": 0.60}}

# (J per KB transferred, J per request for radio wake-up and tail)
NETWORKS: dict[str, tuple[float, float]] = {"wifi": (0.0017, 0.03), "cellular": (0.0020, 12.0)}

J_PER_KWH = 3.6e6


@documented
@dataclass(frozen=True, kw_only=True)
class CostSettings:
    """The cost model (``[cost]``): USD per answer from the bridge's bills, the device's joules and the radio's."""

    electricity_usd_per_kwh: float = setting(0.30, help="electricity price in USD per kWh (example tariff)")
    network: Literal["wifi", "cellular"] = setting("wifi", help="the device's uplink for escalations: wifi or cellular")
    network_j_per_kb: float | None = setting(None, help="override the network's energy per KB transferred (J)")
    network_j_per_request: float | None = setting(None, help="override the network's energy per escalation (radio wake-up and tail, J)")
    prices: dict[str, Any] = setting(factory=lambda: {k: dict(v) for k, v in DEFAULT_PRICES.items()},
                                     help="USD per million input/output tokens per model, for runs without a bridge")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        # built in Python, not read from a config file: the types are checked here too (a NaN tariff made every
        # answer's cost NaN, invalid JSON; an unknown network failed only after an escalation was answered and billed)
        if self.network not in NETWORKS:
            raise ConfigError(f"must be one of {', '.join(map(repr, NETWORKS))}, got {shown(self.network)}",
                              field="cost.network")
        for name in ("electricity_usd_per_kwh", "network_j_per_kb", "network_j_per_request"):
            value = getattr(self, name)
            if value is None and name != "electricity_usd_per_kwh":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value) or value < 0:
                raise ConfigError(f"must be a finite number >= 0, got {shown(value)}", field=f"cost.{name}")
        if not isinstance(self.prices, Mapping):
            raise ConfigError(f"expected a table, got {shown(self.prices)}", field="cost.prices")
        for model, price in self.prices.items():
            if not isinstance(price, dict) or not {"input", "output"} <= set(price):
                raise ConfigError("each model needs input and output prices per million tokens (input = ..., "
                                  "output = ...)", field=f"cost.prices.{model}")
            # a price this table has no column for ("cached") was dropped unsaid: the estimate left it out
            extra = sorted(set(price) - {"input", "output"})
            if extra:
                raise ConfigError("unknown price: a model's prices are input and output per million tokens",
                                  field=f"cost.prices.{model}.{extra[0]}")
            for kind in ("input", "output"):
                value = price[kind]
                # NaN made every reservation NaN, and a budget never saw itself spent; true is not a price either
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value) or value < 0:
                    raise ConfigError(f"must be a finite number >= 0, got {shown(value)}", field=f"cost.prices.{model}.{kind}")

    @property
    def j_per_kb(self) -> float:
        return self.network_j_per_kb if self.network_j_per_kb is not None else NETWORKS[self.network][0]

    @property
    def j_per_request(self) -> float:
        return self.network_j_per_request if self.network_j_per_request is not None else NETWORKS[self.network][1]


def table_prices(settings: CostSettings, model: str) -> tuple[float, float]:
    """(input, output) USD per million tokens from the price table (model name, else ``*``, else 0)."""
    table = settings.prices.get(model) or settings.prices.get("*") or {"input": 0.0, "output": 0.0}
    return float(table["input"]), float(table["output"])


def price_usd(settings: CostSettings, model: str, prompt_tokens: int, completion_tokens: int) -> float:
    """Cloud USD of one call from the price table (model name, else ``*``)."""
    price_in, price_out = table_prices(settings, model)
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


# the chat template's tokens around each message (role markers, separators; ChatML and Llama 3 use ~5)
_TEMPLATE_TOKENS_PER_MESSAGE = 8
# a default system prompt some templates add when the request has none (Qwen2.5's is ~20 tokens)
_DEFAULT_SYSTEM_TOKENS = 32
# the bridge's framing of a draft it shows the cloud model (see cloud_bridge._service._with_hint)
_DRAFT_HINT_TOKENS = 96


def reservation_usd(settings: CostSettings, model: str, bridge_prices: tuple[float, float] | None,
                    messages: Sequence[Mapping[str, Any]], max_new_tokens: int, *, draft: str | None = None) -> float:
    """The most escalating these messages can cost: what a budget reserves (the bridge then bills the real figure).

    An upper bound for the usual chat templates, not a guess: byte-level tokenizers give at most one token per
    UTF-8 byte, the chat template adds a few per message (and some a default system prompt), and a bridge that
    shows the model the device's ``draft`` adds it and its framing.
    Priced at the device's table for ``model`` and at the bridge's own prices (USD per million input, output
    tokens) when known, whichever is higher: a budget that reserved the device's guess would overspend.
    """
    return reservation(settings, model, bridge_prices, messages, max_new_tokens, draft=draft)[0]


def reservation(settings: CostSettings, model: str, bridge_prices: tuple[float, float] | None,
                messages: Sequence[Mapping[str, Any]], max_new_tokens: int, *,
                draft: str | None = None) -> tuple[float, tuple[float, float]]:
    """:func:`reservation_usd` and the prices it was made at: a call billed at prices no higher costs no more,
    which is the price limit an escalation sends."""
    prompt_tokens = sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass")) + _TEMPLATE_TOKENS_PER_MESSAGE
                        for m in messages) + _TEMPLATE_TOKENS_PER_MESSAGE + _DEFAULT_SYSTEM_TOKENS
    if draft is not None:
        prompt_tokens += len(draft.encode("utf-8", "surrogatepass")) + _DRAFT_HINT_TOKENS
    table = table_prices(settings, model)
    estimate = (prompt_tokens * table[0] + max_new_tokens * table[1]) / 1e6
    if bridge_prices is None:
        return estimate, table
    at_bridge = (prompt_tokens * bridge_prices[0] + max_new_tokens * bridge_prices[1]) / 1e6
    if at_bridge <= 0:  # the bridge names no price: the table's is the limit
        return max(estimate, at_bridge), table
    # The bridge checks each price on its own: its own prices, scaled up to what was reserved when the table
    # reserved more. The table's pair could be lower on one side (0.15/0.60 against a bridge's 0.18/0.18) and
    # then refused every call.
    scale = max(estimate / at_bridge, 1.0)
    return at_bridge * scale, (bridge_prices[0] * scale, bridge_prices[1] * scale)


def device_energy_usd(settings: CostSettings, joules: float) -> float:
    return joules / J_PER_KWH * settings.electricity_usd_per_kwh


def network_energy_j(settings: CostSettings, bytes_sent: int, bytes_received: int) -> float:
    """Device energy of one escalation's transfer: bytes × J/KB plus the per-request radio cost."""
    return (bytes_sent + bytes_received) / 1024.0 * settings.j_per_kb + settings.j_per_request


def idle_watts(meter: Any) -> float:
    """The idle watts of an EnergyMeter's device profile (0 without a meter)."""
    profile = getattr(meter, "profile", None)
    return float(profile.idle_watts) if profile is not None else 0.0


def wait_energy_j(meter: Any, wait_ms: float) -> float:
    """The device's own draw while an escalation waits for the cloud: its profile's idle watts over the wait.

    An estimate (the meter's device profile). A local answer's energy is the whole device's while it
    decodes, idle power included; without this an escalation would look free apart from the radio, and a
    goal on joules would always pick the cloud.
    """
    return idle_watts(meter) * max(0.0, wait_ms) / 1000.0

