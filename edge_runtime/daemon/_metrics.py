"""The daemon's counters, in Prometheus' text exposition format (``GET /metrics``).

Written by hand rather than with prometheus_client: a dozen series do not
justify a dependency on the device. Every chat request, HTTP or gRPC, is
counted exactly once in ``edge_runtime_requests_total`` under its outcome
(``answered``, ``rejected``: queue full, loading or draining; ``invalid``;
``cancelled``: the client left; ``timeout``; ``error``), so the outcomes add up
to the requests received. Answered requests are broken down by route.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["Metrics", "Histogram", "OUTCOMES", "ROUTES", "LATENCY_BUCKETS_S"]

OUTCOMES = ("answered", "rejected", "invalid", "cancelled", "timeout", "error")
ROUTES = ("local", "cloud", "fallback", "local_forced")
# from a cached short answer on a laptop to a long answer on a Pi
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class Histogram:
    """Cumulative buckets, sum and count for one label set."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: Labels) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append(f"{name}_bucket{_labels((*labels, ('le', _number(bound))))} {running}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Thread-safe counters of one daemon. ``gauges`` reads live values (queue depth...) at render time."""

    def __init__(self, gauges: Callable[[], Mapping[str, float | Mapping[Labels, float]]] | None = None) -> None:
        self._lock = threading.Lock()
        self._gauges = gauges or (lambda: {})
        self.requests: dict[Labels, float] = {}
        self.answers: dict[Labels, float] = {}
        self.forced_local: dict[Labels, float] = {}
        self.tokens: dict[Labels, float] = {}
        self.draft_tokens: dict[Labels, float] = {}
        self.cached_prompt_tokens = 0
        self.energy_j: dict[Labels, float] = {}
        # the meter's source label and whether it estimates: set when the model loads (None before)
        self.energy_source: tuple[str, bool] | None = None
        self.network_j = 0.0
        self.wait_j = 0.0
        self.cloud_usd = 0.0
        self.cloud_unknown = 0  # escalations the bridge may have billed without saying how much (answered or not)
        self.cloud_errors: dict[Labels, float] = {}  # failed escalations by the error's class
        self.device_usd = 0.0
        self.latency: dict[Labels, Histogram] = {}
        self.queue_wait = Histogram(QUEUE_BUCKETS_S)
        self.ttft: dict[Labels, Histogram] = {}

    # ---- recording ----------------------------------------------------------------------------

    def count_request(self, transport: str, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        key = (("transport", transport), ("outcome", outcome))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_cloud_cost(self, result: Any) -> None:
        """The cloud spend of a request that got no answer (its client left, its answer was not delivered): the
        bridge's bill stands, and so may one the device never learns the amount of."""
        with self._lock:
            self._add_cloud_cost(result)

    def _add_cloud_cost(self, result: Any) -> None:
        usd = float(result.cost.get("cloud_usd") or 0.0)
        # a counter only rises: one NaN would read NaN for the daemon's life, a negative one as a reset to Prometheus
        self.cloud_usd += usd if math.isfinite(usd) and usd > 0 else 0.0
        self.cloud_unknown += bool(result.cost.get("cloud_usd_unknown"))

    def observe_answer(self, result: Any, *, queue_s: float, total_s: float, ttft_s: float | None = None) -> None:
        """Add an answered request (a HybridResult) to the route, token, energy, cost and latency series."""
        route = result.route
        with self._lock:
            key = (("route", route),)
            self.answers[key] = self.answers.get(key, 0) + 1
            for side in ("local", "cloud"):
                for kind, n in (("prompt", result.usage[side]["prompt_tokens"]),
                                ("completion", result.usage[side]["completion_tokens"])):
                    tkey = (("route", route), ("side", side), ("kind", kind))
                    self.tokens[tkey] = self.tokens.get(tkey, 0) + n
            self.cached_prompt_tokens += result.cached_prompt_tokens
            for outcome, n in result.predictions.items():
                pkey = (("outcome", outcome),)
                self.draft_tokens[pkey] = self.draft_tokens.get(pkey, 0) + n
            self.energy_j[key] = self.energy_j.get(key, 0.0) + float(result.energy.get("joules") or 0.0)
            self.network_j += float(result.energy.get("network_joules") or 0.0)
            self.wait_j += float(result.energy.get("wait_joules") or 0.0)
            self._add_cloud_cost(result)
            if getattr(result, "cloud_error", None):
                ekey = (("error", getattr(result, "cloud_error_type", None) or "other"),)
                self.cloud_errors[ekey] = self.cloud_errors.get(ekey, 0) + 1
            if route == "local_forced":  # why: a budget spent, its prices unknown (the bridge down), privacy...
                fkey = (("reason", str(getattr(result, "reason", "") or "other")),)
                self.forced_local[fkey] = self.forced_local.get(fkey, 0) + 1
            self.device_usd += float(result.cost.get("device_energy_usd") or 0.0)
            self.latency.setdefault(key, Histogram(LATENCY_BUCKETS_S)).observe(total_s)
            if ttft_s is not None:
                self.ttft.setdefault(key, Histogram(LATENCY_BUCKETS_S)).observe(ttft_s)
            self.queue_wait.observe(queue_s)

    # ---- reading ------------------------------------------------------------------------------

    def escalation_ratio(self) -> float:
        """Share of answered requests that went to the cloud (answered there, or failed over to the fallback)."""
        with self._lock:
            answered = sum(self.answers.values())
            escalated = sum(v for k, v in self.answers.items() if dict(k)["route"] in ("cloud", "fallback"))
        return escalated / answered if answered else 0.0

    def render(self) -> str:
        gauges = dict(self._gauges())
        ratio = self.escalation_ratio()
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Mapping[Labels, float] | float) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            if isinstance(samples, Mapping):
                for labels, value in sorted(samples.items()):
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
            else:
                lines.append(f"{name} {_number(samples)}")

        def histograms(name: str, help_text: str, series: Mapping[Labels, Histogram]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} histogram")
            for labels, h in sorted(series.items()):
                lines.extend(h.lines(name, labels))

        with self._lock:
            requests = dict(self.requests)
            for outcome in OUTCOMES:  # every outcome shows, at 0 until it happens
                for transport in ("http", "grpc"):
                    requests.setdefault((("transport", transport), ("outcome", outcome)), 0)
            answers = {(("route", r),): self.answers.get((("route", r),), 0) for r in ROUTES}
            family("edge_runtime_requests_total", "counter",
                   "Chat requests received, by transport and outcome (the outcomes add up to the requests).", requests)
            family("edge_runtime_answers_total", "counter", "Answered chat requests by route.", answers)
            family("edge_runtime_forced_local_total", "counter",
                   "Answers kept on the device that the policy would otherwise have let escalate (route local_forced), "
                   "by reason: budget_exhausted, budget_prices_unknown (the bridge's prices could not be read: it is "
                   "down), privacy_pattern:<name>, cancelled, cloud_not_configured...", dict(self.forced_local))
            family("edge_runtime_tokens_total", "counter",
                   "Tokens processed for answered requests, by route, side (local/cloud) and kind (prompt/completion).",
                   dict(self.tokens))
            family("edge_runtime_draft_tokens_total", "counter",
                   "Prompt-lookup drafts checked by local decoding ([engine] prompt_lookup), by outcome (accepted/rejected).",
                   {(("outcome", o),): self.draft_tokens.get((("outcome", o),), 0) for o in ("accepted", "rejected")})
            family("edge_runtime_cached_prompt_tokens_total", "counter",
                   "Local prompt tokens whose KV state was kept from an earlier request or turn (not prefilled again); "
                   "part of edge_runtime_tokens_total's local prompt tokens.", self.cached_prompt_tokens)
            family("edge_runtime_escalation_ratio", "gauge",
                   "Share of answered requests escalated to the cloud (route cloud or fallback) since the daemon "
                   "started; for a recent rate, use rate() of edge_runtime_answers_total.", ratio)
            family("edge_runtime_energy_joules_total", "counter",
                   "Device energy spent on answered requests, by route (estimated unless a counter measured it: "
                   "see edge_runtime_energy_source_info); escalations' radio and waiting energy are in "
                   "edge_runtime_network_energy_joules_total and edge_runtime_wait_energy_joules_total.",
                   {(("route", r),): self.energy_j.get((("route", r),), 0.0) for r in ROUTES})
            if self.energy_source is not None:
                source, estimated = self.energy_source
                family("edge_runtime_energy_source_info", "gauge",
                       "The meter's chosen energy source: a counter (estimated=\"false\") or an estimate; a request "
                       "whose window that source did not measure whole fell back to the estimate, as its energy says.",
                       {(("source", source), ("estimated", "true" if estimated else "false")): 1})
            family("edge_runtime_network_energy_joules_total", "counter",
                   "Estimated radio energy of escalations (cost model).", self.network_j)
            family("edge_runtime_wait_energy_joules_total", "counter",
                   "Estimated device energy while escalations waited for the cloud (the profile's idle watts).",
                   self.wait_j)
            family("edge_runtime_cloud_cost_usd_total", "counter",
                   "USD billed by the cloud bridge, as its answers said, delivered to the client or not (not the calls "
                   "counted in edge_runtime_cloud_cost_unknown_total).", self.cloud_usd)
            family("edge_runtime_cloud_errors_total", "counter",
                   "Escalations that failed (answered by the local fallback) by error: CloudTimeoutError, "
                   "CloudUnavailableError, CircuitOpenError (the cloud skipped), CloudAuthError, CloudQuotaError...",
                   dict(self.cloud_errors))
            family("edge_runtime_cloud_cost_unknown_total", "counter",
                   "Escalations that failed or were cancelled after the bridge took them (also when the client left "
                   "before its answer): it may have billed what it generated, an amount the device never learns (the "
                   "bridge's access log has it).",
                   self.cloud_unknown)
            family("edge_runtime_device_energy_cost_usd_total", "counter",
                   "Device, network and wait energy at the configured electricity price, in USD.", self.device_usd)
            histograms("edge_runtime_request_duration_seconds",
                       "Time to answer a chat request, queueing included, by route.", self.latency)
            histograms("edge_runtime_time_to_first_token_seconds",
                       "Streamed requests: time to the first text sent, queueing included, by route.", self.ttft)
            histograms("edge_runtime_queue_wait_seconds", "Time answered requests waited for a generation slot.",
                       {(): self.queue_wait})
        for name, (kind, help_text) in _GAUGES.items():
            value = gauges.get(name, 0.0)
            family(name, kind, help_text, value if isinstance(value, Mapping) else float(value))
        return "\n".join(lines) + "\n"


_GAUGES = {
    "edge_runtime_queue_depth": ("gauge", "Requests waiting for a generation slot."),
    "edge_runtime_requests_in_progress": ("gauge", "Requests past the queue: generating, or waiting for the cloud bridge."),
    "edge_runtime_generation_slots_busy": ("gauge", "Generation slots in use (an escalation hands its slot on while it waits)."),
    "edge_runtime_queue_capacity": ("gauge", "Requests that may wait before new ones are refused (server.queue_size)."),
    "edge_runtime_generation_slots": ("gauge", "Generations that may run at once (engine.max_sessions)."),
    "edge_runtime_ready": ("gauge", "1 when the model is loaded and the daemon takes requests, else 0."),
    "edge_runtime_budget_usd": ("gauge", "Each budget policy's cap (USD per period), by budget (budget, or budget[i] "
                                         "for the i-th of several in the chain)."),
    "edge_runtime_budget_spent_usd": ("gauge", "What each budget policy counts as spent in its current period, by "
                                               "budget: bills settled plus reservations of escalations in flight (an "
                                               "escalation is refused when its reservation would pass the cap)."),
}

