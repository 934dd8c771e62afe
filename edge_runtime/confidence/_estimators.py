"""Confidence estimators: ``p_correct`` in [0, 1] for a local answer, and their JSON form.

Families (all studied by ``edge-runtime eval --study``):

- ``heuristic`` — never fitted: the geometric-mean probability of the
  answer-span tokens, halved when no answer of the expected form is found.
- ``generic`` — a logistic curve over six model-agnostic signals (min token
  logprob and margin, first-token logprob, eos logprob, finish reason,
  length). The built-in default (:data:`DEFAULT_ESTIMATOR`, used when no
  estimator file is given) is this family fitted once on SmolLM2-135M int4
  over the default dev split and saved without a bundle hash; it is not
  calibrated for your bundle: run ``edge-runtime calibrate`` for that.
- ``signal:<feature>`` — one feature through a fitted 1-D logistic curve
  (the single-signal baselines).
- ``logistic`` — a calibrated logistic regression over a feature set
  (``multi``: every feature; ``span``: answer-span features only; ``prompt``:
  prompt-only features, usable before decoding), optionally with the kNN prior
  as one more feature (``multi+knn``).
- ``knn`` — a pre-generation router: accuracy of the k most similar labelled
  dev prompts (sentence embeddings), decided before any decoding.
- ``selfcheck`` — ask the model whether its answer is right and calibrate
  P(yes) (AutoMix-style); costs one more prefill per request.

A fitted estimator records the bundle it was calibrated on (manifest hash) and
refuses to load for another one.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import write_text_whole
from ..errors import EstimatorError
from ._embed import ENCODER_DIM, ENCODER_NAME
from ._features import FEATURES, PROMPT_FEATURES, SPAN_FEATURES, Signals, feature_vector
from ._logistic import LogisticModel
from ._selfcheck import selfcheck_messages, yes_probability

log = logging.getLogger(__name__)

__all__ = [
    "Estimator",
    "HeuristicEstimator",
    "LogisticEstimator",
    "KnnPrior",
    "CloudPrior",
    "CLOUD_PROMPT_FEATURES",
    "KnnEstimator",
    "SelfCheckEstimator",
    "check_bundle_hash",
    "load_estimator",
    "save_estimator",
    "FEATURE_SETS",
    "ESTIMATOR_SCHEMA_VERSION",
    "DEFAULT_ESTIMATOR",
]

ESTIMATOR_SCHEMA_VERSION = 1

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "multi": FEATURES,
    # few, model-agnostic signals: the built-in default is this family fitted once (see DEFAULT_ESTIMATOR)
    "generic": ("lp_min", "margin_min", "first_lp", "eos_lp", "finish_eos", "tokens_log"),
    "span": (*SPAN_FEATURES, "finish_eos", "tokens_log"),
    "prompt": PROMPT_FEATURES,
}


class Estimator:
    """Base: ``p_correct(signals)`` after decoding; ``pre_p_correct(prompt)`` when it can decide from the prompt."""

    name = "estimator"
    needs_prompt_nll = False
    needs_engine = False
    can_pre_route = False
    bundle_hash: str | None = None
    cloud: CloudPrior | None = None  # set when fitted with cloud labels (calibrate --cloud-bundle, the explorer)

    def p_correct(self, signals: Signals, *, engine: Any = None, messages: Sequence[Mapping[str, Any]] | None = None) -> float:
        raise NotImplementedError

    def pre_p_correct(self, prompt: str, prompt_tokens: int = 0) -> float:
        raise EstimatorError(f"estimator {self.name!r} needs the local answer; it cannot decide from the prompt alone")

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


class HeuristicEstimator(Estimator):
    """Uncalibrated default: exp(mean logprob of the answer-span tokens), halved if no answer was found."""

    name = "heuristic"

    def p_correct(self, signals: Signals, *, engine: Any = None, messages: Sequence[Mapping[str, Any]] | None = None) -> float:
        f = feature_vector(signals)
        if not signals.logprobs:
            return 0.0
        if f["ans_found"]:
            return float(math.exp(f["ans_lp_mean"]))
        return 0.5 * float(math.exp(f["lp_mean"]))

    def to_dict(self) -> dict[str, Any]:
        # the cloud prior is kept (calibrate --family heuristic --cloud-bundle), as every other kind keeps it
        return {"schema_version": ESTIMATOR_SCHEMA_VERSION, "kind": "heuristic", "name": self.name,
                "cloud": self.cloud.to_dict() if self.cloud is not None else None}


class KnnPrior:
    """Share of correct answers among the k most similar labelled prompts (cosine of sentence embeddings)."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray, k: int = 15, *, encoder: Any = None) -> None:
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=float)
        self.k = int(k)
        self._encoder = encoder

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from ._embed import shared_encoder

            self._encoder = shared_encoder()
        return self._encoder

    def prior_from_embedding(self, emb: np.ndarray, *, exclude: int | None = None) -> float:
        sims = self.embeddings @ emb
        if exclude is not None:
            sims = sims.copy()
            sims[exclude] = -np.inf
        k = min(self.k, len(sims) - (exclude is not None))
        idx = np.argpartition(-sims, k - 1)[:k]
        w = np.exp((sims[idx] - 1.0) * 20.0)  # closer neighbours weigh more
        # Laplace smoothing toward the overall accuracy keeps sparse neighbourhoods honest
        base = float(self.labels.mean())
        # a weighted mean of 0/1 labels lies in [0, 1]; rounding can step past 1 by an ulp (all labels 1)
        return min(max(float((np.dot(w, self.labels[idx]) + base) / (w.sum() + 1.0)), 0.0), 1.0)

    def prior(self, prompt: str) -> float:
        return self.prior_from_embedding(self.encoder.encode([prompt])[0])

    def to_dict(self) -> dict[str, Any]:
        raw = self.embeddings.astype(np.float16).tobytes()
        return {"k": self.k, "encoder": ENCODER_NAME, "dim": int(self.embeddings.shape[1]),
                "labels": self.labels.astype(int).tolist(), "embeddings_f16": base64.b64encode(raw).decode("ascii")}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KnnPrior:
        # embeddings from another encoder, k < 1 or labels other than 0/1 would give priors that look fine and mean
        # nothing (k = 0 even picks a neighbour); refuse them at load instead
        _check_object(d, "knn")
        if d.get("encoder") != ENCODER_NAME:
            raise ValueError(f"knn.encoder is {d.get('encoder')!r}; this runtime embeds prompts with {ENCODER_NAME!r}")
        k = d["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"knn.k must be an integer >= 1, got {k!r}")
        labels = np.asarray(d["labels"], dtype=float)
        if labels.ndim != 1 or not len(labels) or not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError("knn.labels must be a non-empty list of 0 and 1")
        emb = np.frombuffer(base64.b64decode(d["embeddings_f16"]), dtype=np.float16).astype(np.float32)
        if not np.isfinite(emb).all():  # a NaN neighbour makes every prior NaN
            raise ValueError("knn.embeddings_f16 holds values that are not finite numbers")
        # another dim failed only at the first prior (a matmul's shape error in the middle of a request), and a
        # blob of the wrong length as numpy's "cannot reshape"
        dim = d["dim"]
        if type(dim) is not int or dim != ENCODER_DIM:
            raise ValueError(f"knn.dim is {dim!r}; {ENCODER_NAME} embeds prompts in {ENCODER_DIM} dimensions")
        if emb.size != len(labels) * dim:
            raise ValueError(f"knn.embeddings_f16 holds {emb.size} numbers; {len(labels)} labels × {dim} dimensions "
                             f"need {len(labels) * dim}")
        return cls(emb.reshape(len(labels), dim), labels, k)


def _check_object(value: Any, field: str) -> None:
    # a hand-edited file's null or string where an object belongs was an AttributeError traceback
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be an object, got {type(value).__name__}")


CLOUD_PROMPT_FEATURES = ("prompt_tokens_log", "prompt_numbers", "prompt_max_digits", "expects_number", "expects_yesno")


class CloudPrior:
    """P(the cloud answers correctly | prompt): a logistic curve over prompt features and the cloud's
    accuracy on the k most similar labelled dev prompts. Prompt-only, so it is known before decoding;
    with the local ``p_correct`` it gives the expected gain of escalating (the ``gain`` policy)."""

    def __init__(self, model: LogisticModel, knn: KnnPrior) -> None:
        self.model = model
        self.knn = knn

    def p_cloud(self, prompt: str, prompt_tokens: int, *, knn_prior: float | None = None) -> float:
        s = Signals(prompt=prompt, text="", token_texts=(), logprobs=(), entropies=(), margins=(), finish_reason="length",
                    prompt_tokens=prompt_tokens, prompt_nll=None)
        f = feature_vector(s)
        f["cloud_knn"] = self.knn.prior(prompt) if knn_prior is None else knn_prior
        return float(self.model.predict(np.array([f[n] for n in self.model.features]))[0])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "knn": self.knn.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CloudPrior:
        _check_object(d, "cloud")
        _check_object(d["model"], "cloud.model")
        return cls(LogisticModel.from_dict(d["model"]), KnnPrior.from_dict(d["knn"]))


class LogisticEstimator(Estimator):
    """Calibrated logistic regression over named features (optionally plus the kNN prior as ``knn_prior``)."""

    kind = "logistic"

    def __init__(self, name: str, model: LogisticModel, *, knn: KnnPrior | None = None, bundle_hash: str | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.model = model
        self.knn = knn
        self.bundle_hash = bundle_hash
        self.meta = dict(meta or {})
        self.needs_prompt_nll = "prompt_nll" in model.features
        self.can_pre_route = set(model.features) <= {*PROMPT_FEATURES, "knn_prior"} and "prompt_nll" not in model.features

    def _row(self, f: Mapping[str, float]) -> np.ndarray:
        return np.array([f[name] for name in self.model.features], dtype=float)

    def p_correct(self, signals: Signals, *, engine: Any = None, messages: Sequence[Mapping[str, Any]] | None = None,
                  knn_prior: float | None = None) -> float:
        f = feature_vector(signals)
        if "knn_prior" in self.model.features:
            if knn_prior is None:
                if self.knn is None:
                    raise EstimatorError(f"estimator {self.name!r} uses knn_prior but carries no kNN data")
                knn_prior = self.knn.prior(signals.prompt)
            f["knn_prior"] = knn_prior
        return float(self.model.predict(self._row(f))[0])

    def pre_p_correct(self, prompt: str, prompt_tokens: int = 0) -> float:
        """Before decoding; ``prompt_tokens`` (the prompt's length in the bundle's tokens) feeds the
        prompt-length features, which would read 0 without it."""
        if not self.can_pre_route:
            return super().pre_p_correct(prompt)
        s = Signals(prompt=prompt, text="", token_texts=(), logprobs=(), entropies=(), margins=(), finish_reason="length",
                    prompt_tokens=prompt_tokens, prompt_nll=None)
        return self.p_correct(s)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": ESTIMATOR_SCHEMA_VERSION, "kind": "logistic", "name": self.name,
                "bundle_hash": self.bundle_hash, "model": self.model.to_dict(),
                "knn": self.knn.to_dict() if self.knn is not None else None, "meta": self.meta,
                "cloud": self.cloud.to_dict() if self.cloud is not None else None}


class KnnEstimator(Estimator):
    """Pre-generation router: p_correct from the prompt alone, before spending energy on decoding."""

    name = "knn"
    can_pre_route = True

    def __init__(self, knn: KnnPrior, *, bundle_hash: str | None = None, meta: Mapping[str, Any] | None = None) -> None:
        self.knn = knn
        self.bundle_hash = bundle_hash
        self.meta = dict(meta or {})

    def pre_p_correct(self, prompt: str, prompt_tokens: int = 0) -> float:
        return self.knn.prior(prompt)

    def p_correct(self, signals: Signals, *, engine: Any = None, messages: Sequence[Mapping[str, Any]] | None = None) -> float:
        return self.knn.prior(signals.prompt)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": ESTIMATOR_SCHEMA_VERSION, "kind": "knn", "name": self.name, "bundle_hash": self.bundle_hash,
                "knn": self.knn.to_dict(), "meta": self.meta, "cloud": self.cloud.to_dict() if self.cloud is not None else None}


class SelfCheckEstimator(Estimator):
    """Ask the model whether its answer is right; a fitted curve maps logit P(yes) to p_correct."""

    name = "selfcheck"
    needs_engine = True

    def __init__(self, a: float, b: float, *, bundle_hash: str | None = None, meta: Mapping[str, Any] | None = None) -> None:
        self.a, self.b = float(a), float(b)
        self.bundle_hash = bundle_hash
        self.meta = dict(meta or {})

    def from_p_yes(self, p_yes: float) -> float:
        p = min(max(p_yes, 1e-6), 1 - 1e-6)
        # clipped as the logistic models' are: a steep fit (a = 70) overflowed math.exp at a low P(yes), and the
        # answers judged most likely wrong lost their estimate
        z = min(max(self.a * math.log(p / (1 - p)) + self.b, -40.0), 40.0)
        return 1.0 / (1.0 + math.exp(-z))

    def p_correct(self, signals: Signals, *, engine: Any = None, messages: Sequence[Mapping[str, Any]] | None = None) -> float:
        if engine is None:
            raise EstimatorError("the selfcheck estimator needs the engine to ask the model")
        msgs = messages or [{"role": "user", "content": signals.prompt}]
        return self.from_p_yes(yes_probability(engine, selfcheck_messages(msgs, signals.text)))

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": ESTIMATOR_SCHEMA_VERSION, "kind": "selfcheck", "name": self.name, "bundle_hash": self.bundle_hash,
                "a": self.a, "b": self.b, "meta": self.meta, "cloud": self.cloud.to_dict() if self.cloud is not None else None}


def save_estimator(estimator: Estimator, path: str | os.PathLike[str]) -> None:
    """Write ``estimator`` to ``path`` whole or not at all: a daemon may load it at its next start, and a write cut
    short (a full disk) used to leave invalid JSON in place of the previous estimator."""
    try:
        write_text_whole(path, json.dumps(estimator.to_dict(), indent=1) + "\n")
    except OSError as err:
        raise EstimatorError(f"cannot write {path}: {err.strerror or err}") from err


DEFAULT_ESTIMATOR = Path(__file__).with_name("data") / "default_estimator.json"


def check_bundle_hash(fitted_on: str | None, bundle_hash: str | None, *, what: str = "the estimator",
                      legacy_hash: str | None = None) -> None:
    """An estimator reads one bundle's signals: refuse it for another (no hash on either side: any bundle).

    ``legacy_hash``: the bundle's hash as earlier versions computed it (its files alone, not its manifest), which
    files they calibrated record. Refusing those would stop every daemon at its upgrade; they are used, with a warning
    that an edit to the manifest since (its chat template) would not be noticed."""
    if fitted_on and legacy_hash and fitted_on == legacy_hash and fitted_on != bundle_hash:
        log.warning("%s was calibrated by an earlier edge-runtime, whose bundle hash did not cover manifest.json (it "
                    "records %s…, the bundle's files; the bundle's hash is now %s…): it is used for this bundle, whose "
                    "files it was fitted on; if the bundle's chat template or tokens changed since, or to record the "
                    "new hash, run `edge-runtime calibrate` again", what, fitted_on[:12], (bundle_hash or "?")[:12])
        return
    if fitted_on and bundle_hash and fitted_on != bundle_hash:
        # a caller that passed no legacy hash cannot tell an earlier version's file of this very bundle (review 29)
        earlier = ("; a file calibrated by an earlier edge-runtime records the bundle's files' hash: pass "
                   "legacy_hash=engine.legacy_bundle_hash to load_estimator to use it") if legacy_hash is None else ""
        raise EstimatorError(
            f"{what} was calibrated for another bundle (hash {fitted_on[:12]}…, this one is {bundle_hash[:12]}…{earlier}): "
            "run `edge-runtime calibrate` for this bundle"
        )


def fitted_on_another_model(estimator: Any, model_name: str) -> str | None:
    """Why ``estimator``'s p_correct is not calibrated for ``model_name``, or None. A portable one (the built-in
    default, ``calibrate --portable``) still ranks another model's answers, but its probabilities are its own
    model's: the built-in one's calibration error was 0.154 on Qwen2.5-Coder against 0.051 on SmolLM2."""
    fitted_on = (getattr(estimator, "meta", None) or {}).get("bundle_name")
    if not fitted_on or fitted_on == model_name:
        return None
    return (f"the confidence estimator {getattr(estimator, 'name', '?')!r} was fitted on {fitted_on}, not {model_name}: "
            "its p_correct is not calibrated for this model (fit one: edge-runtime calibrate --bundle ...)")


# what an estimator file may weigh: the default's is 150 KB, one with an embedding model's weights a few MB
MAX_ESTIMATOR_BYTES = 64 << 20


def load_estimator(path: str | os.PathLike[str] | None, *, bundle_hash: str | None = None,
                   legacy_hash: str | None = None) -> Estimator:
    """Read an estimator file (None: the built-in default); refuse one calibrated on another bundle.

    A file without ``bundle_hash`` (``calibrate --portable``) loads for any bundle. ``legacy_hash``: see
    :func:`check_bundle_hash`.
    """
    from ..bundle import read_small_file

    p = DEFAULT_ESTIMATOR if path is None else Path(path)
    try:
        # bounded, and refused unless a regular file: --estimator /dev/zero read until the kernel killed the process
        d = json.loads(read_small_file(p, MAX_ESTIMATOR_BYTES).decode("utf-8"))
    except FileNotFoundError as err:
        raise EstimatorError(f"estimator file not found: {p}") from err
    except OSError as err:  # a directory, no permission, a FIFO, too large ...
        raise EstimatorError(f"cannot read the estimator file {p}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EstimatorError(f"{p} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise EstimatorError(f"{p} is not valid JSON: nested too deeply") from err
    if not isinstance(d, dict):
        raise EstimatorError(f"{p}: expected a JSON object")
    version = d.get("schema_version")
    if isinstance(version, bool) or version != ESTIMATOR_SCHEMA_VERSION:
        raise EstimatorError(f"{p}: estimator schema_version {version!r} is not supported (this runtime reads {ESTIMATOR_SCHEMA_VERSION})")
    recorded = d.get("bundle_hash")
    if recorded is not None and not isinstance(recorded, str):
        raise EstimatorError(f"{p}: bundle_hash must be a string or null, got {recorded!r}")
    check_bundle_hash(recorded, bundle_hash, what=str(p), legacy_hash=legacy_hash)
    if recorded is not None and bundle_hash and recorded == legacy_hash:
        recorded = bundle_hash  # accepted above for this bundle (and warned about once): bound to its hash from here on
    kind = d.get("kind")
    if d.get("meta") is not None and not isinstance(d["meta"], Mapping):
        raise EstimatorError(f"{p}: meta must be an object, got {type(d['meta']).__name__}")
    est: Estimator
    try:
        if kind == "heuristic":
            est = HeuristicEstimator()
        elif kind == "logistic":
            knn = KnnPrior.from_dict(d["knn"]) if d.get("knn") is not None else None
            if not isinstance(d.get("name"), str):
                raise ValueError(f"name must be a string, got {d.get('name')!r}")
            _check_object(d["model"], "model")
            est = LogisticEstimator(d["name"], LogisticModel.from_dict(d["model"]), knn=knn, bundle_hash=recorded, meta=d.get("meta"))
        elif kind == "knn":
            est = KnnEstimator(KnnPrior.from_dict(d["knn"]), bundle_hash=recorded, meta=d.get("meta"))
        elif kind == "selfcheck":
            a, b = d["a"], d["b"]
            # numbers, finite: "nan" (or 1e400, true) loaded, and every answer's p_correct read NaN, so no threshold
            # ever had an estimate to compare
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (a, b)):
                raise ValueError(f"a and b must be finite numbers, got {a!r:.40} and {b!r:.40}")
            est = SelfCheckEstimator(float(a), float(b), bundle_hash=recorded, meta=d.get("meta"))
        else:
            raise EstimatorError(f"{p}: unknown estimator kind {kind!r} (expected heuristic, logistic, knn or selfcheck)")
        if d.get("cloud") is not None:
            est.cloud = CloudPrior.from_dict(d["cloud"])
    except KeyError as err:  # str(KeyError) is the bare quoted key
        raise EstimatorError(f"{p}: malformed {kind} estimator (the field {err.args[0]!r} is missing)") from err
    except (TypeError, ValueError) as err:
        raise EstimatorError(f"{p}: malformed {kind} estimator ({err})") from err
    # a feature this runtime does not compute would fail at the first answer scored, not here
    unknown = sorted(set(est.model.features) - {*FEATURES, "knn_prior"}) if isinstance(est, LogisticEstimator) else []
    if est.cloud is not None:
        unknown += sorted(set(est.cloud.model.features) - {*CLOUD_PROMPT_FEATURES, "cloud_knn"})
    if unknown:
        raise EstimatorError(f"{p}: uses feature(s) {', '.join(unknown)} that this runtime does not compute")
    if isinstance(est, LogisticEstimator) and "knn_prior" in est.model.features and est.knn is None:
        # it loaded, and then every request failed, local answers included (the prior is computed from knn's data)
        raise EstimatorError(f"{p}: malformed {kind} estimator (its model uses the feature knn_prior, and the field "
                             "'knn' that it is computed from is missing or null)")
    return est
