"""How likely is the local answer to be right? ``p_correct`` from the engine's own signals.

::

    from edge_runtime.confidence import load_estimator, signals_from_result

    estimator = load_estimator("estimator.json", bundle_hash=engine.bundle_hash,     # None: the built-in default
                               legacy_hash=engine.legacy_bundle_hash)    # (files calibrated by earlier versions)
    result = engine.generate(messages=messages, prompt_nll=estimator.needs_prompt_nll)
    p = estimator.p_correct(signals_from_result(result, messages=messages), engine=engine, messages=messages)

See :mod:`edge_runtime.confidence._estimators` for the families and
``edge-runtime calibrate`` / ``edge-runtime eval --study`` for fitting and
measuring them.
"""

from ._estimators import (
    DEFAULT_ESTIMATOR,
    ESTIMATOR_SCHEMA_VERSION,
    FEATURE_SETS,
    Estimator,
    HeuristicEstimator,
    KnnEstimator,
    CloudPrior,
    KnnPrior,
    LogisticEstimator,
    SelfCheckEstimator,
    check_bundle_hash,
    fitted_on_another_model,
    load_estimator,
    save_estimator,
)
from ._features import FEATURES, Signals, answer_span, expected_answer_type, feature_vector, no_answer, signals_from_record, signals_from_result
from ._fit import FAMILIES, SINGLE_SIGNALS, Dataset, check_family, cloud_scores, estimator_scores, fit_cloud_prior, fit_estimator, make_dataset
from ._logistic import LogisticModel, fit_logistic
from ._sample_size import FEW_FAMILY_ITEMS, FEW_ITEMS, fit_warnings, fitted_features, half_width_95, wilson_interval
from ._selfcheck import SELFCHECK_QUESTION, yes_probability

__all__ = [
    "FEW_ITEMS",
    "FEW_FAMILY_ITEMS",
    "fit_warnings",
    "fitted_features",
    "half_width_95",
    "wilson_interval",
    "check_family",
    "Estimator",
    "HeuristicEstimator",
    "LogisticEstimator",
    "KnnEstimator",
    "KnnPrior",
    "CloudPrior",
    "fit_cloud_prior",
    "cloud_scores",
    "SelfCheckEstimator",
    "check_bundle_hash",
    "fitted_on_another_model",
    "load_estimator",
    "save_estimator",
    "ESTIMATOR_SCHEMA_VERSION",
    "DEFAULT_ESTIMATOR",
    "FEATURE_SETS",
    "FEATURES",
    "Signals",
    "signals_from_result",
    "signals_from_record",
    "feature_vector",
    "no_answer",
    "answer_span",
    "expected_answer_type",
    "FAMILIES",
    "SINGLE_SIGNALS",
    "Dataset",
    "make_dataset",
    "fit_estimator",
    "estimator_scores",
    "LogisticModel",
    "fit_logistic",
    "SELFCHECK_QUESTION",
    "yes_probability",
]
