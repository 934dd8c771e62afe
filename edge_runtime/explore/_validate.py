"""Online check: run the recommended policy live through the daemon and the bridge on held-back items.

The daemon speaks OpenAI's chat-completions API and reports the route it took
in its ``routing`` extension; the prediction is the replayed accuracy and
escalation rate of the same policy on the explored items. Agreement is judged
with a two-sample test at 95% (prediction and live sample both count).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from ..errors import EdgeRuntimeError
from ..runs import RUN_SETTINGS, progress_bar
from ..tasks import TaskItem, score

__all__ = ["validate_live", "agreement"]


def _post(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise EdgeRuntimeError(f"daemon answered HTTP {err.code}: {err.read()[:300].decode(errors='replace')}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise EdgeRuntimeError(f"cannot reach the daemon at {url}: {err}") from err


def validate_live(daemon_url: str, items: Sequence[TaskItem], *, timeout_s: float = 300.0) -> dict[str, Any]:
    """Ask the daemon (model ``auto``) every item; return measured accuracy, escalation rate and routes."""
    url = daemon_url.rstrip("/") + "/v1/chat/completions"
    correct, escalated, routes = [], [], []
    for item in progress_bar(items, total=len(items), desc="live check via the daemon"):
        body = {"model": "auto", "messages": [dict(m) for m in item.messages], "max_tokens": RUN_SETTINGS.max_new_tokens,
                "temperature": 0}
        reply = _post(url, body, timeout_s)
        text = reply["choices"][0]["message"]["content"] or ""
        route = reply.get("routing", {}).get("route", "local")
        correct.append(score(item, text).correct)
        escalated.append(route == "cloud")
        routes.append(route)
    n = len(items)
    return {"n": n, "accuracy": sum(correct) / n if n else math.nan, "escalation_rate": sum(escalated) / n if n else math.nan,
            "routes": {r: routes.count(r) for r in sorted(set(routes))}}


TOO_WIDE = 0.30  # a margin wider than this many points cannot tell a right prediction from a wrong one
MIN_CHECKED = 10  # fewer held-back items tell nothing, even where the margin reads 0 (every answer right, or wrong)


def verdict(ok: bool, margins: Sequence[float], n: int) -> str:
    """The live check's conclusion. A disagreement found is said whatever the count; an agreement on a few
    held-back items, where almost any result would agree, is not claimed."""
    if not ok:
        return "DO NOT agree within sampling error"
    if n < MIN_CHECKED or max(margins) > TOO_WIDE:
        return "too few held-back items to tell"
    return "agree within sampling error"


def agreement(predicted: float, measured: float, n: int, n_predicted: int) -> tuple[bool, float]:
    """Whether two rates agree within sampling error (and the margin): a two-sample test at 95%.

    The prediction is itself a sample (``n_predicted`` replayed items), not an exact figure: a test that
    took it as one would call a right prediction wrong about twice as often as it says.
    """
    n, n_predicted = max(n, 1), max(n_predicted, 1)
    pooled = (predicted * n_predicted + measured * n) / (n_predicted + n)
    margin = 1.96 * math.sqrt(pooled * (1 - pooled) * (1 / n_predicted + 1 / n))
    return abs(measured - predicted) <= margin + 1e-12, margin
