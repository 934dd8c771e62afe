"""Goal-driven recommendation: pick the policy that meets the user's goal, and write it as a daemon config.

Goal grammar (terms separated by spaces)::

    [max-accuracy] CONSTRAINT [CONSTRAINT ...]

    CONSTRAINT := accuracy>=X | accuracy>=X*cloud | accuracy>=X*local
                | usd<=X/1k | joules<=X | latency<=X   (ms, p50) | escalation<=X

Without ``max-accuracy`` the goal picks the *cheapest* policy meeting every
constraint (least cloud USD, then device joules, then p50 latency); with it,
the most accurate one meeting them (ties: the cheapest). Budget-capped policies
are reported but never recommended: what a cap does depends on the traffic
volume, which a replay over a fixed list of items cannot know. Examples::

    accuracy>=0.95*cloud
    max-accuracy usd<=0.50/1k
    max-accuracy joules<=2.5
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError
from ..runs import RUN_SETTINGS
from ._space import Point

__all__ = ["Goal", "parse_goal", "recommend", "config_snippet", "GOAL_HELP"]

GOAL_HELP = ("expected e.g. 'accuracy>=0.95*cloud', 'max-accuracy usd<=0.50/1k' or 'max-accuracy joules<=2'; "
             "constraints: accuracy>=X[*cloud|*local], usd<=X/1k, joules<=X, latency<=X (ms), escalation<=X")

_TERM = re.compile(
    r"^(?P<metric>accuracy|usd|joules|latency|escalation)(?P<op>>=|<=)(?P<value>\d+(?:\.\d+)?)"
    r"(?:(?P<rel>\*cloud|\*local)|(?P<per>/1k))?$"
)
_METRIC = {"accuracy": "accuracy", "usd": "cloud_usd_per_1k", "joules": "device_j_per_request",
           "latency": "latency_p50_ms", "escalation": "escalation_rate"}
_ALLOWED_OP = {"accuracy": ">=", "usd": "<=", "joules": "<=", "latency": "<=", "escalation": "<="}


@dataclass(frozen=True)
class Constraint:
    metric: str  # a Point metric key
    op: str
    value: float
    relative_to: str | None  # "cloud" / "local": value is a share of that baseline's accuracy

    def bound(self, baselines: dict[str, float]) -> float:
        return self.value * baselines[self.relative_to] if self.relative_to else self.value

    def describe(self, baselines: dict[str, float]) -> str:
        b = self.bound(baselines)
        rel = f" ({self.value:g} × {self.relative_to} {baselines[self.relative_to]:.1%})" if self.relative_to else ""
        return f"{self.metric} {self.op} {b:.4g}{rel}"


@dataclass(frozen=True)
class Goal:
    text: str
    maximize_accuracy: bool
    constraints: tuple[Constraint, ...]


def parse_goal(text: str) -> Goal:
    terms = text.split()
    if not terms:
        raise ConfigError(f"empty goal; {GOAL_HELP}", field="goal")
    maximize = terms[0] == "max-accuracy"
    if maximize:
        terms = terms[1:]
    if not terms:
        raise ConfigError(f"'max-accuracy' needs at least one constraint; {GOAL_HELP}", field="goal")
    constraints = []
    for term in terms:
        m = _TERM.match(term)
        if m is None:
            raise ConfigError(f"cannot read {term!r}; {GOAL_HELP}", field="goal")
        metric, op = m["metric"], m["op"]
        if op != _ALLOWED_OP[metric]:
            raise ConfigError(f"{term!r}: {metric} takes {_ALLOWED_OP[metric]}, not {op}", field="goal")
        if m["rel"] and metric != "accuracy":
            raise ConfigError(f"{term!r}: only accuracy can be relative to cloud or local", field="goal")
        if metric == "usd" and not m["per"]:
            raise ConfigError(f"{term!r}: give cloud spend per 1,000 requests, e.g. usd<=0.50/1k", field="goal")
        if m["per"] and metric != "usd":
            raise ConfigError(f"{term!r}: /1k only applies to usd", field="goal")
        value = float(m["value"])
        if metric in ("accuracy", "escalation") and not m["rel"] and value > 1:
            raise ConfigError(f"{term!r}: {metric} is a fraction in [0, 1]", field="goal")
        constraints.append(Constraint(_METRIC[metric], op, value, m["rel"][1:] if m["rel"] else None))
    # the text goes into the configs' comments: one line, whatever whitespace separated the terms
    return Goal(text=" ".join(text.split()), maximize_accuracy=maximize, constraints=tuple(constraints))


def _cost_key(p: Point, fam: str | None) -> tuple[float, float, float]:
    return (round(p.metric("cloud_usd_per_1k", fam), 9), round(p.metric("device_j_per_request", fam), 9),
            p.metric("latency_p50_ms", fam))


def recommend(goal: Goal, points: Sequence[Point], baselines: dict[str, float], task_family: str | None = None) -> Point | None:
    """The point meeting every constraint: cheapest, or most accurate with ``max-accuracy``. None if none meets it."""
    def ok(p: Point) -> bool:
        for c in goal.constraints:
            v, b = p.metric(c.metric, task_family), c.bound(baselines)
            if (c.op == ">=" and v < b - 1e-12) or (c.op == "<=" and v > b + 1e-12):
                return False
        return True

    # a budget cap's effect depends on traffic volume, which replay over a fixed item list cannot know:
    # such points stay in the report but are not recommended
    feasible = [p for p in points if ok(p) and "budget" not in p.family]
    if not feasible:
        return None
    if goal.maximize_accuracy:
        return min(feasible, key=lambda p: (-round(p.metric("accuracy", task_family), 9), *_cost_key(p, task_family)))
    return min(feasible, key=lambda p: _cost_key(p, task_family))


def config_snippet(point: Point, *, estimator_path: str, n_items: int, requests_per_day: float, goal: str,
                   bundle: str | None = None, cloud: str = "", cost: Any = None, prompt_lookup: int = 0,
                   power: Any = None) -> str:
    """The recommended policy as a TOML file ``edge-runtime serve --config`` loads as is.

    ``bundle``: the edge bundle the estimator was fitted on (an estimator refuses
    any other). ``cloud``: the ``[cloud]`` section, or comments saying what to put
    there; without one, every escalation is answered locally (``local_forced``).
    ``cost``: the CostSettings the points were priced with; the settings that differ
    from the defaults go into ``[cost]``, so the daemon reports energy and cost as predicted.
    ``prompt_lookup``: the edge answers' decoding (drafts change int4/int8 answers at
    near-ties), set in ``[engine]`` when on, so the daemon answers as measured.
    ``power``: the PowerSettings the energy was measured with; those that differ from
    the defaults go into ``[power]``, so the daemon measures the same way.
    """
    config: dict[str, Any] = point.config
    parts = config["chain"] if "chain" in config else [config]
    lines = [
        f"# recommended by `edge-runtime explore` for the goal: {goal}",
        f"# policy: {point.name}; replayed accuracy {point.overall['accuracy']:.1%}, escalation "
        f"{point.overall['escalation_rate']:.1%}, cloud USD {point.overall['cloud_usd_per_1k']:.4f} per 1k requests",
        "[engine]",
        *([f"bundle = {toml_value(bundle)}"] if bundle is not None else []),
        f"estimator = {toml_value(estimator_path)}",
        *([f"prompt_lookup = {int(prompt_lookup)}"] if prompt_lookup else []),
        # the answers were measured at this length: longer ones would route, cost and take differently
        f"max_new_tokens = {RUN_SETTINGS.max_new_tokens}  # a request's own max_tokens still applies",
        "",
    ]
    translated = []
    for part in parts:
        if part.get("type") == "budget":
            # replay capped spend over the explored items; in the daemon the cap is per day at the stated traffic
            part = {"type": "budget", "usd": round(part["usd"] / n_items * requests_per_day, 6), "period_s": 86400}
        translated.append(dict(part))
    lines.append("[policy]")
    if len(translated) == 1:
        lines += [f"{k} = {toml_value(v)}" for k, v in translated[0].items()]
    else:
        inline = ["{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in part.items()) + "}" for part in translated]
        lines += ["chain = [", *[f"  {x}," for x in inline], "]"]
    if cloud:
        lines += ["", cloud.rstrip("\n")]
    for name, settings in (("cost", cost), ("power", power)):
        if settings is not None and (section := _changed_toml(name, settings)):
            lines += ["", *section]
    return "\n".join(lines) + "\n"


def _changed_toml(name: str, settings: Any) -> list[str]:
    """A ``[name]`` section of the scalar settings that differ from the defaults (``[cost]``'s prices are the bridge's)."""
    default = type(settings)()
    changed = [(f.name, value) for f in fields(settings)
               if not isinstance(value := getattr(settings, f.name), dict) and value is not None
               and value != getattr(default, f.name)]
    return [f"[{name}]", *(f"{n} = {toml_value(v)}" for n, v in changed)] if changed else []


def toml_value(v: Any) -> str:
    """A TOML value: booleans, numbers (numpy scalars too), and strings escaped."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()  # numpy scalars from the search grid: repr(np.float64(0.25)) is not TOML
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
