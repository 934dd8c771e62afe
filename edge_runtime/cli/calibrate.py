"""``edge-runtime calibrate`` (fit a confidence estimator) and ``edge-runtime eval`` (measure it)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import THREADS_HELP
from ._flags import naming_flags

log = logging.getLogger("edge_runtime.calibrate")

DEFAULT_FAMILY = "multi"
# the settings these commands pass on, by the flags that set them: an error names what the user typed
_FLAGS = {"intra_op_threads": "--threads", "prompt_lookup": "--prompt-lookup", "family": "--family"}


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="run the SLM over a labelled split and fit a confidence estimator")
    c.add_argument("--bundle", required=True, help="edge bundle (directory or cached name)")
    c.add_argument("--suite", default="default", help="task suite name or JSONL file (default: default)")
    c.add_argument("--split", default="dev", help="split to fit on (default: dev)")
    c.add_argument("--out", required=True, help="estimator JSON to write")
    c.add_argument("--family", default=DEFAULT_FAMILY,
                   help=f"estimator family (default {DEFAULT_FAMILY}; see `eval --study`): heuristic, generic, multi, span, selfcheck, "
                        "knn, prompt, multi+knn, signal:<feature>")
    c.add_argument("--cloud-bundle",
                   help="bundle standing in for the cloud model (run locally on the same items): adds a prompt-only estimate "
                        "of the cloud's correctness, which the `gain` policy uses")
    c.add_argument("--portable", action="store_true",
                   help="do not bind the estimator to this bundle's hash (it then loads for any bundle; use with care)")
    c.add_argument("--limit", type=int, help="use only N items, each task family in turn (quick runs)")
    c.add_argument("--threads", type=int, help=THREADS_HELP)
    _lookup_argument(c)
    c.add_argument("--json", action="store_true", help="print the fit summary as JSON")
    c.set_defaults(func=_calibrate)

    e = sub.add_parser("eval", help="measure a confidence estimator (and routing to a cloud model) on a split")
    e.add_argument("--bundle", required=True, help="edge bundle (directory or cached name)")
    e.add_argument("--cloud-bundle", help="bundle standing in for the cloud model (run locally); enables routing metrics")
    e.add_argument("--suite", default="default", help="task suite name or JSONL file (default: default)")
    e.add_argument("--split", default="test", help="split to measure on (default: test)")
    e.add_argument("--estimator", help="estimator JSON (default: the built-in `generic`, fitted once on SmolLM2 and shipped)")
    e.add_argument("--study", action="store_true",
                   help="fit every estimator family on the dev split and report them side by side on --split")
    e.add_argument("--limit", type=int, help="use only N items of each split, each task family in turn (quick runs)")
    e.add_argument("--threads", type=int, help=THREADS_HELP)
    _lookup_argument(e)
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=_eval)


def _lookup_argument(parser: argparse.ArgumentParser) -> None:
    from ..engine import PROMPT_LOOKUP_TOKENS

    parser.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP_TOKENS, metavar="N",
                        help="prompt-lookup drafts per step for the edge model, as the daemon's [engine] prompt_lookup "
                             "(default: off; its answers are cached apart). The cloud stand-in never drafts, as a bridge")


def _warn_if_in_sample(fitted_on: Mapping[str, Any], items: Sequence[Any], suite: str, split: str) -> None:
    """Warn when the estimator was fitted on some of ``items``: a kNN prior finds each such item itself (AUROC 1.0
    for a 0.6 estimator). Told by the questions it recorded; an estimator written before it recorded them, by the
    suite's name and split (which miss a suite under another name: ``arithmetic`` is part of ``default``)."""
    from ..runs import prompt_key

    fitted_split = fitted_on.get("split")
    recorded = fitted_on.get("fitted_prompts")
    if isinstance(recorded, list):
        fitted = set(recorded)
        shared = sum(prompt_key(item) in fitted for item in items)
        if shared:
            log.warning("the estimator was fitted on %d of these %d items (%s/%s): scoring them is in-sample, and its "
                        "figures look better than they are (use another split)", shared, len(items),
                        fitted_on.get("suite"), fitted_split)
    elif fitted_on.get("suite") == suite and fitted_split is not None and (
            fitted_split == split or "all" in (fitted_split, split)):
        log.warning("the estimator was fitted on %s/%s: scoring %s/%s is in-sample, and its figures look better than "
                    "they are (use another split)", suite, fitted_split, suite, split)


def _items(suite: str, split: str, limit: int | None) -> list[Any]:
    from ..errors import InvalidRequestError
    from ..tasks import first_items, load_suite

    items = first_items(load_suite(suite, split), limit, field="--limit")
    if not items:
        raise InvalidRequestError(f"the {split} split of suite {suite!r} has no items", field="--split")
    return items


@naming_flags(_FLAGS)
def _calibrate(args: argparse.Namespace) -> int:
    from ..confidence import estimator_scores, fit_estimator, fit_warnings, fitted_features, make_dataset, save_estimator
    from ..engine import Engine
    from ..metrics import auroc, expected_calibration_error
    from ..models import resolve_bundle
    from ..runs import prompt_keys, run_edge

    from ..confidence import check_family

    # what can be checked is checked before the model runs over the split
    check_family(args.family)
    _check_writable(Path(args.out))
    items = _items(args.suite, args.split, args.limit)
    cloud_bundle = _cloud_bundle(args)
    engine = Engine(resolve_bundle(args.bundle, field="--bundle"), intra_op_threads=args.threads, prompt_lookup=args.prompt_lookup)
    records = run_edge(engine, items, selfcheck=args.family == "selfcheck", desc=f"{args.split} (edge)")
    data = make_dataset(records, items)
    for warning in fit_warnings(data.labels, fitted_features(args.family)):
        log.warning("%s", warning)
    cloud = _cloud_labels(cloud_bundle, args.threads, items, data)
    estimator = fit_estimator(args.family, data, bundle_hash=None if args.portable else engine.bundle_hash, cloud_labels=cloud)
    p = estimator_scores(estimator, data, training_data=True)  # in-sample, but no row votes for itself
    summary = {
        "estimator": estimator.name, "out": args.out, "bundle": engine.model_name, "items": len(data),
        "accuracy": round(float(data.labels.mean()), 6), "parse_errors": sum(bool(r.get("parse_error")) for r in records),
        # six digits, as the other reports: the printed summary rounds again, and 0.2595 would print 25.9%, not 26.0%
        "dev_in_sample": {"auroc": round(auroc(p, data.labels), 6), "ece": round(expected_calibration_error(p, data.labels), 6)},
    }
    summary = _json_safe(summary)  # one class only in the split: AUROC is undefined, written as null, not NaN
    meta = getattr(estimator, "meta", None)
    if isinstance(meta, dict):
        meta.update({"suite": args.suite, "split": args.split, "dev_in_sample": summary["dev_in_sample"], "bundle_name": engine.model_name,
                     "fitted_prompts": prompt_keys(items)})
        if cloud_bundle is not None and estimator.cloud is not None:
            from ..bundle import load_manifest

            # what the prior describes, as a bridge serving this bundle names it in ListModels: the runtime warns
            # when the bridge's model is another
            manifest = load_manifest(cloud_bundle)
            meta["cloud_model"] = {"model": manifest.name, "revision": manifest.bundle_hash,
                                   "files_revision": manifest.legacy_bundle_hash}  # what older bridges report
    save_estimator(estimator, args.out)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"fitted {estimator.name} on {len(data)} {args.split} items (SLM accuracy {summary['accuracy']:.1%}); "
              f"in-sample AUROC {_fmt(summary['dev_in_sample']['auroc'])}, ECE {_fmt(summary['dev_in_sample']['ece'])}; "
              f"wrote {args.out}")
    return 0


def _json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: strict JSON has no NaN (Python and jq read it, most parsers do not)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _check_writable(out: Path) -> None:
    from ..errors import InvalidRequestError

    if out.is_dir():
        raise InvalidRequestError(f"{out} is a directory; give the estimator file's path", field="--out")
    if not out.parent.is_dir():
        raise InvalidRequestError(f"the directory {out.parent} does not exist", field="--out")
    # written after the whole split has run: find out now whether it can be (root passes access(); /sys does not)
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=True):
            pass
    except OSError as err:
        raise InvalidRequestError(f"cannot write in {out.parent}: {err.strerror or err}", field="--out") from err


def _cloud_bundle(args: argparse.Namespace) -> Path | None:
    """``--cloud-bundle`` resolved before any model runs: a typo must not cost a whole edge split first."""
    from ..models import resolve_bundle

    return resolve_bundle(args.cloud_bundle, field="--cloud-bundle") if args.cloud_bundle else None


def _cloud_labels(bundle: Path | None, threads: int | None, items: list[Any], data: Any) -> Any:
    """The cloud stand-in's correctness on the dataset's items (None without --cloud-bundle)."""
    import numpy as np

    recs = _cloud_records(bundle, threads, items)
    if recs is None:
        return None
    by_id = {r["item_id"]: bool(r.get("correct")) for r in recs}
    return np.array([by_id[r["item_id"]] for r in data.records], dtype=float)


def _cloud_records(bundle: Path | None, threads: int | None, items: list[Any]) -> list[dict[str, Any]] | None:
    if bundle is None:
        return None
    from ..engine import Engine
    from ..runs import check_cloud_runs, engine_key, local_cloud_generate, run_cloud

    # decodes as the bridge's ONNX backend does (no prompt lookup), whatever the edge model does
    cloud = Engine(bundle, intra_op_threads=threads, energy_meter=None)
    records = run_cloud(local_cloud_generate(cloud), f"local-{engine_key(cloud)}", items, desc="cloud")
    # a failed run (a prompt past the stand-in's context) counted as a wrong answer in eval's accuracy and in the
    # labels of calibrate's cloud prior, as explore refuses to
    check_cloud_runs(records)
    return records


def _report(scores: Any, data: Any, cloud: dict[str, bool] | None, families: list[str]) -> dict[str, Any]:
    """Metrics overall and per task family for one confidence score."""
    import numpy as np

    from ..metrics import auroc, expected_calibration_error, routing_metrics

    fams = np.array(families)
    out: dict[str, Any] = {}
    for fam in ["overall", *sorted(set(families))]:
        mask = np.ones(len(fams), bool) if fam == "overall" else fams == fam
        lc = data.labels[mask]
        s = scores[mask]
        if cloud is not None:
            cc = np.array([cloud[r["item_id"]] for r, m in zip(data.records, mask) if m])
            out[fam] = routing_metrics(s, lc, cc).to_dict()
        else:
            out[fam] = {"n": int(mask.sum()), "local_accuracy": float(lc.mean()), "auroc": auroc(s, lc),
                        "ece": expected_calibration_error(s, lc) if ((s >= 0) & (s <= 1)).all() else None}
    return out


def _gain_report(scores: Any, data: Any, cloud: dict[str, bool], families: list[str]) -> dict[str, Any]:
    """Routing metrics of an expected-gain score; AUROC and ECE do not apply (it is not a probability of local success)."""
    rep = _report(scores, data, cloud, families)
    for r in rep.values():
        r["auroc"] = r["ece"] = None
    return rep


@naming_flags(_FLAGS)
def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from ..bundle import load_manifest
    from ..confidence import FAMILIES, SINGLE_SIGNALS, cloud_scores, estimator_scores, fit_estimator, load_estimator, make_dataset, no_answer
    from ..engine import Engine
    from ..models import resolve_bundle
    from ..runs import run_edge

    from ..errors import InvalidRequestError

    if args.study and args.estimator:
        raise InvalidRequestError("--study fits every estimator family itself; leave out --estimator", field="--estimator")
    if args.study and args.split != "test":
        # the study fits on dev: scoring dev items too is in-sample (a kNN prior finds each item itself)
        log.warning("--study fits every estimator on the dev split: with --split %s it scores items it was fitted "
                    "on, and its figures look better than they are (use --split test)", args.split)
    items = _items(args.suite, args.split, args.limit)
    cloud_bundle = _cloud_bundle(args)
    engine = Engine(resolve_bundle(args.bundle, field="--bundle"), intra_op_threads=args.threads, prompt_lookup=args.prompt_lookup)
    # the estimator is read before the split runs: a wrong path or another bundle's file fails at once
    est = None if args.study else load_estimator(args.estimator, bundle_hash=engine.bundle_hash,
                                                 legacy_hash=engine.legacy_bundle_hash)
    _warn_if_in_sample(getattr(est, "meta", None) or {}, items, args.suite, args.split)
    records = run_edge(engine, items, selfcheck=args.study, desc=f"{args.split} (edge)")
    data = make_dataset(records, items)
    cloud_recs = _cloud_records(cloud_bundle, args.threads, items)
    cloud = None if cloud_recs is None else {r["item_id"]: bool(r.get("correct")) for r in cloud_recs}
    families = [r["family"] for r in data.records]

    reports: dict[str, Any] = {}
    if args.study:
        dev_items = _items(args.suite, "dev", args.limit)
        dev = make_dataset(run_edge(engine, dev_items, selfcheck=True, desc="dev (edge)"), dev_items)
        for name in SINGLE_SIGNALS:
            # raw signal for AUROC/routing; the fitted 1-D curve gives a probability for ECE
            raw = data.matrix([name])[:, 0]
            rep = _report(raw, data, cloud, families)
            fitted = estimator_scores(fit_estimator(f"signal:{name}", dev, bundle_hash=engine.bundle_hash), data)
            from ..metrics import expected_calibration_error

            rep["overall"]["ece"] = round(expected_calibration_error(fitted, data.labels), 6)
            reports[f"signal:{name}"] = rep
        dev_cloud = _cloud_labels(cloud_bundle, args.threads, dev_items, dev) if cloud is not None else None
        p_cloud = None
        for fam in FAMILIES:
            est = fit_estimator(fam, dev, bundle_hash=engine.bundle_hash, cloud_labels=dev_cloud if p_cloud is None else None)
            if est.cloud is not None:
                p_cloud = cloud_scores(est.cloud, data)
            p = estimator_scores(est, data)
            reports[fam] = _report(p, data, cloud, families)
            if p_cloud is not None:
                # routing by expected gain: escalate first where the cloud is likeliest to beat the device
                reports[f"{fam} → gain"] = _gain_report(p - p_cloud, data, cloud, families)
    else:
        assert est is not None
        if est.needs_engine:
            scores = np.array([0.0 if no_answer(s.text) else est.p_correct(s, engine=engine) for s in data.signals])
        else:
            scores = estimator_scores(est, data)
        reports[est.name] = _report(scores, data, cloud, families)
        if est.cloud is not None and cloud is not None:
            reports[f"{est.name} → gain"] = _gain_report(scores - cloud_scores(est.cloud, data), data, cloud, families)

    # an answer the scorer could not read counts as wrong; how many there were is part of the result
    parse_errors = {"edge": sum(bool(r.get("parse_error")) for r in records)}
    if cloud_recs is not None:
        parse_errors["cloud"] = sum(bool(r.get("parse_error")) for r in cloud_recs)
    # the hash the run cache keys the answers by: a published figure can be traced to its bundle (QA QQ)
    out = _json_safe({"bundle": engine.model_name, "bundle_hash": engine.bundle_hash,
                      **({"cloud_bundle_hash": load_manifest(cloud_bundle).bundle_hash} if cloud_bundle else {}),
                      "suite": args.suite, "split": args.split, "items": len(data),
                      "local_accuracy": round(float(data.labels.mean()), 6), "parse_errors": parse_errors,
                      "cloud": args.cloud_bundle, **({"prompt_lookup": args.prompt_lookup} if args.prompt_lookup else {}),
                      "estimators": reports})
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _print_table(out)
    return 0


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def _print_table(out: dict[str, Any]) -> None:
    w = sys.stdout.write
    w(f"{out['bundle']} (bundle {out['bundle_hash'][:12]}) on {out['suite']}/{out['split']} ({out['items']} items)"
      + (f", cloud {out['cloud']} (bundle {out['cloud_bundle_hash'][:12]})" if out["cloud"] else "")
      + (f", edge prompt lookup {out['prompt_lookup']}" if out.get("prompt_lookup") else "") + "\n")
    unread = ", ".join(f"{n} {side}" for side, n in out["parse_errors"].items())
    w(f"local accuracy {out['local_accuracy']:.1%}; answers the scorer could not read (counted wrong): {unread}\n")
    w(f"{'estimator':<22} {'AUROC':>6} {'ECE':>6} {'APGR':>6} {'CPT50':>6} {'CPT80':>6}\n")
    for name, rep in out["estimators"].items():
        o = rep["overall"]
        cpt = o.get("cpt", {})
        w(f"{name:<22} {_fmt(o.get('auroc')):>6} {_fmt(o.get('ece')):>6} {_fmt(o.get('apgr')):>6} "
          f"{_fmt(cpt.get('50%'), True):>6} {_fmt(cpt.get('80%'), True):>6}\n")
    first = next(iter(out["estimators"].values()))["overall"]
    if "random" in first:
        w(f"{'random routing':<22} {'':>6} {'':>6} {_fmt(first['random']['apgr']):>6} {_fmt(first['random']['cpt'].get('50%'), True):>6} "
          f"{_fmt(first['random']['cpt'].get('80%'), True):>6}\n")
        w(f"local accuracy {first['local_accuracy']:.1%}, cloud accuracy {first['cloud_accuracy']:.1%}\n")
