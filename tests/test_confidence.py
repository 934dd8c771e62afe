"""Confidence estimator: features, fitting, estimator files, kNN prior, and the calibrate/eval commands end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_runtime.cli import main
from edge_runtime.confidence import (
    HeuristicEstimator,
    KnnEstimator,
    KnnPrior,
    LogisticEstimator,
    Signals,
    answer_span,
    check_bundle_hash,
    expected_answer_type,
    feature_vector,
    fit_logistic,
    load_estimator,
    save_estimator,
)
from edge_runtime.confidence._embed import ENCODER_DIM
from edge_runtime.errors import EstimatorError


def _signals(prompt: str, tokens: list[str], logprobs: list[float], finish: str = "eos") -> Signals:
    n = len(tokens)
    return Signals(prompt=prompt, text="".join(tokens[:-1] if finish == "eos" else tokens), token_texts=tokens,
                   logprobs=logprobs, entropies=[0.5] * n, margins=[0.4] * n, finish_reason=finish, prompt_tokens=12, prompt_nll=2.5)


def test_expected_answer_type_reads_the_prompt():
    assert expected_answer_type("Is 17 a prime number? Answer yes or no.") == "yesno"
    assert expected_answer_type("What is 37 + 48? Answer with just the number.") == "number"
    assert expected_answer_type("How many legs does a spider have?") == "number"
    assert expected_answer_type("What is the capital of France?") == "text"


def test_answer_span_features_cover_only_the_answer_tokens():
    s = _signals("What is 37 + 48? Give only the number.", ["The", " answer", " is", " 8", "5", ".", "<eos>"],
                 [-0.1, -0.2, -0.1, -2.0, -1.0, -0.3, -0.05])
    assert answer_span(s.text, "number") == (14, 16)
    f = feature_vector(s)
    assert f["ans_found"] == 1.0 and f["ans_tokens"] == 2.0
    assert f["ans_lp_mean"] == pytest.approx(-1.5) and f["ans_lp_min"] == pytest.approx(-2.0)
    assert f["lp_mean"] == pytest.approx(np.mean([-0.1, -0.2, -0.1, -2.0, -1.0, -0.3]))  # eos token excluded
    assert f["eos_lp"] == pytest.approx(-0.05) and f["finish_eos"] == 1.0
    assert f["prompt_numbers"] == 2 and f["prompt_max_digits"] == 2 and f["expects_number"] == 1.0


def test_the_answer_span_of_a_number_is_the_whole_number_not_a_part_of_an_earlier_one():
    """QA 7: "15 - 10 = 5" read its answer's span inside the 15 (the first "5" in the text), so the answer-span
    features were the 15's tokens' signals."""
    assert answer_span("15 - 10 = 5", "number") == (10, 11)
    assert answer_span("5,000 - 4,995 = 5.", "number") == (16, 17)
    assert answer_span("The answer is 85.", "number") == (14, 16)
    s = _signals("What is 15 - 10?", ["1", "5", " -", " ", "1", "0", " =", " ", "5", "<eos>"],
                 [-0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -0.1, -3.0, -0.1])
    f = feature_vector(s)
    assert f["ans_tokens"] == 1.0 and f["ans_lp_mean"] == pytest.approx(-3.0)

def test_the_answer_span_reads_the_answers_tokens_when_the_first_tokens_space_is_not_in_the_text():
    """QA 7: a SentencePiece model's (Llama 2, Mistral) first token is " The" where the decoded text starts "The"
    (tests/engine: the tokens' texts are " " + the text), so every answer span was one character early: "85" read
    the tokens " " and "8", not "8" and "5"."""
    tokens = [" The", " answer", " is", " ", "8", "5", ".", "</s>"]
    s = Signals(prompt="What is 37 + 48?", text="The answer is 85.", token_texts=tokens,
                logprobs=[-0.1, -0.1, -0.1, -0.1, -2.0, -3.0, -0.1, -0.1], entropies=[0.1] * 8, margins=[0.5] * 8,
                finish_reason="eos", prompt_tokens=10, prompt_nll=None)
    f = feature_vector(s)
    assert f["ans_tokens"] == 2.0 and f["ans_lp_mean"] == pytest.approx(-2.5) and f["ans_first_lp"] == pytest.approx(-2.0)
    byte_level = Signals(prompt=s.prompt, text=" The answer is 85.", token_texts=tokens, logprobs=s.logprobs,
                         entropies=s.entropies, margins=s.margins, finish_reason="eos", prompt_tokens=10, prompt_nll=None)
    assert feature_vector(byte_level)["ans_lp_mean"] == pytest.approx(-2.5)  # text and tokens alike: as before

def test_missing_answer_is_flagged_and_the_heuristic_is_lower():
    good = _signals("Is 9 prime? Answer yes or no.", ["No", ".", "<eos>"], [-0.2, -0.3, -0.1])
    bad = _signals("Is 9 prime? Answer yes or no.", ["I", " think", " so", "<eos>"], [-0.2, -0.3, -0.2, -0.1])
    assert feature_vector(good)["ans_found"] == 1.0 and feature_vector(bad)["ans_found"] == 0.0
    h = HeuristicEstimator()
    assert h.p_correct(good) == pytest.approx(math.exp(-0.2))
    assert 0 <= h.p_correct(bad) < h.p_correct(good)


def test_logistic_fit_separates_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(scale=0.5, size=400) > 0).astype(float)
    model = fit_logistic(x, y, ("a", "b"))
    assert model.coef[0] > 0 > model.coef[1]
    p = model.predict(x)
    assert ((p > 0.5) == (y > 0.5)).mean() > 0.8
    again = type(model).from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.allclose(again.predict(x), p)


class FakeEncoder:
    """Deterministic 'embeddings': one axis per topic word (as long as the real encoder's, which a file must match)."""

    words = ("prime", "capital", "plus", "reverse")

    def encode(self, texts):
        axes = [[1.0 if w in t else 0.0 for w in self.words] + [0.1] for t in texts]
        out = np.pad(np.array(axes, dtype=np.float32), ((0, 0), (0, ENCODER_DIM - len(self.words) - 1)))
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_an_estimator_using_the_knn_prior_without_its_data_is_refused_at_load(tmp_path):
    """QA 7: a multi+knn file whose knn was nulled (or deleted) loaded, and then every request failed with "carries
    no kNN data", local answers included, even under the never policy."""
    model = fit_logistic(np.array([[0.0, 0.2], [1.0, 0.9], [0.2, 0.1], [0.9, 0.7]]), np.array([0, 1, 0, 1.0]),
                         ("lp_min", "knn_prior"))
    path = tmp_path / "est.json"
    save_estimator(LogisticEstimator("multi+knn", model), path)
    with pytest.raises(EstimatorError, match=r"est\.json.*knn_prior.*'knn'"):
        load_estimator(path)
    raw = json.loads(path.read_text())
    del raw["knn"]
    path.write_text(json.dumps(raw))
    with pytest.raises(EstimatorError, match=r"est\.json.*knn_prior.*'knn'"):
        load_estimator(path)


def test_knn_prior_follows_similar_prompts_and_leaves_itself_out():
    prompts = ["is 7 prime"] * 5 + ["capital of peru"] * 5
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1], float)
    enc = FakeEncoder()
    knn = KnnPrior(enc.encode(prompts), labels, k=4, encoder=enc)
    assert knn.prior("is 11 prime") > 0.6 > 0.4 > knn.prior("capital of chad")
    knn5 = KnnPrior(knn.embeddings, labels, k=5, encoder=enc)
    own = knn5.prior_from_embedding(knn5.embeddings[4], exclude=4)
    assert own > knn5.prior_from_embedding(knn5.embeddings[4])  # its own 0 label no longer counts
    back = KnnPrior.from_dict(json.loads(json.dumps(knn.to_dict())))
    back._encoder = enc
    assert back.prior("is 11 prime") == pytest.approx(knn.prior("is 11 prime"), abs=1e-3)


def test_estimator_files_are_checked(tmp_path):
    model = fit_logistic(np.array([[0.0], [1.0], [0.2], [0.9]]), np.array([0, 1, 0, 1.0]), ("lp_mean",))
    est = LogisticEstimator("signal:lp_mean", model, bundle_hash="a" * 64)
    path = tmp_path / "est.json"
    save_estimator(est, path)
    assert isinstance(load_estimator(path, bundle_hash="a" * 64), LogisticEstimator)
    with pytest.raises(EstimatorError, match="calibrated for another bundle.*legacy_hash="):  # the hint (review 29)
        load_estimator(path, bundle_hash="b" * 64)
    with pytest.raises(EstimatorError, match="calibrated for another bundle") as refused:
        load_estimator(path, bundle_hash="b" * 64, legacy_hash="c" * 64)
    assert "legacy_hash" not in str(refused.value)
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(EstimatorError, match="schema_version 99"):
        load_estimator(path)
    path.write_text(json.dumps({**raw, "kind": "oracle"}))
    with pytest.raises(EstimatorError, match="unknown estimator kind"):
        load_estimator(path)
    path.write_text("{not json")
    with pytest.raises(EstimatorError, match="not valid JSON"):
        load_estimator(path)
    with pytest.raises(EstimatorError, match="not found"):
        load_estimator(tmp_path / "missing.json")
    with pytest.raises(EstimatorError, match="cannot read the estimator file"):
        load_estimator(tmp_path)  # a directory
    # QA XX: a traceback, and /dev/zero read until the kernel killed the process
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EstimatorError, match="nested too deeply"):
        load_estimator(path)
    with pytest.raises(EstimatorError, match="not a regular file"):
        load_estimator("/dev/zero")
    default = load_estimator(None, bundle_hash="c" * 64)  # the built-in default is portable
    assert default.name == "generic" and default.bundle_hash is None
    for broken, message in (({**raw, "bundle_hash": 12345}, "bundle_hash must be a string"),
                            ({**raw, "schema_version": True}, "schema_version True"),
                            ({**raw, "model": {**raw["model"], "coef": [float("nan")]}}, "finite"),
                            ({**raw, "model": {**raw["model"], "std": [0.0]}}, "std must be positive"),
                            ({k: v for k, v in raw.items() if k != "model"}, "the field 'model' is missing"),
                            ({**raw, "name": 5}, "name must be a string, got 5"),
                            # a hand edit's null or string where an object belongs (it was an AttributeError)
                            ({**raw, "model": None}, "model must be an object, got NoneType"),
                            ({**raw, "knn": "x"}, "knn must be an object, got str"),
                            ({**raw, "kind": "knn", "knn": None}, "knn must be an object, got NoneType"),
                            ({**raw, "knn": ""}, "knn must be an object, got str"),  # read as "no prior"
                            ({**raw, "meta": "ab"}, "meta must be an object, got str"),
                            ({**raw, "cloud": "x"}, "cloud must be an object, got str"),
                            # a self-check's coefficients: "nan" loaded and scored every answer NaN (no estimate)
                            ({**raw, "kind": "selfcheck", "a": "nan", "b": 1}, "a and b must be finite numbers"),
                            ({**raw, "kind": "selfcheck", "a": 1.0, "b": float("inf")}, "a and b must be finite"),
                            ({**raw, "kind": "selfcheck", "a": True, "b": 1}, "a and b must be finite numbers")):
        path.write_text(json.dumps(broken))  # NaN: Python writes and reads it; it would score every answer NaN
        with pytest.raises(EstimatorError, match=message):
            load_estimator(path)


def test_a_stop_string_ends_an_answer_as_eos_does_not_as_a_cut_off():
    tokens, lps = ["The", " answer", " is", " 85", "\n\n"], [-0.1, -0.2, -0.1, -0.3, -0.05]
    f_eos, f_stop, f_len = (feature_vector(_signals("What is 37 + 48?", tokens, lps, finish)) for finish in
                            ("eos", "stop", "length"))
    assert f_stop["finish_eos"] == f_eos["finish_eos"] == 1.0 and f_stop["eos_lp"] == f_eos["eos_lp"]
    assert f_len["finish_eos"] == 0.0 and f_len["eos_lp"] == -10.0


def test_a_heuristic_estimator_keeps_its_cloud_prior_and_pre_routing_reads_the_prompt_length(tmp_path):
    from edge_runtime.confidence import CloudPrior

    est = HeuristicEstimator()
    prior_model = fit_logistic(np.array([[1.0], [5.0], [2.0], [6.0]]), np.array([1, 0, 1, 0.0]), ("prompt_tokens_log",))
    enc = FakeEncoder()
    est.cloud = CloudPrior(prior_model, KnnPrior(enc.encode(["is 7 prime", "capital of peru"]), np.array([1, 0.0]), k=1,
                                                 encoder=enc))
    save_estimator(est, tmp_path / "h.json")
    assert load_estimator(tmp_path / "h.json").cloud is not None  # calibrate --family heuristic --cloud-bundle
    model = fit_logistic(np.log1p(np.array([[3.0], [4.0], [200.0], [300.0]])), np.array([1, 1, 0, 0.0]),
                         ("prompt_tokens_log",))
    pre = LogisticEstimator("signal:prompt_tokens_log", model)
    assert pre.can_pre_route
    assert pre.pre_p_correct("short", 3) > 0.5 > pre.pre_p_correct("long", 300)  # it read 0 tokens for every prompt


def test_knn_estimator_decides_before_decoding():
    enc = FakeEncoder()
    knn = KnnPrior(enc.encode(["is 7 prime", "reverse abc"]), np.array([1.0, 0.0]), k=1, encoder=enc)
    est = KnnEstimator(knn)
    assert est.can_pre_route
    assert est.pre_p_correct("is 13 prime") > est.pre_p_correct("reverse xyz")
    with pytest.raises(EstimatorError, match="cannot decide from the prompt"):
        HeuristicEstimator().pre_p_correct("anything")


@pytest.fixture()
def tiny_suite(tmp_path):
    lines = []
    for i in range(12):
        for split in ("dev", "test"):
            lines.append({"id": f"{split}-{i}", "family": "arith" if i % 2 else "words", "split": split,
                          "messages": [{"role": "user", "content": f"what is {i} + {i + 1}? give only the number."}],
                          "answers": [str(2 * i + 1)], "scorer": "number"})
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture()
def split_suite(tiny_suite):
    """tiny_suite with other questions in its test split (there, each test item asks a dev item's question)."""
    lines = [json.loads(line) for line in tiny_suite.read_text().splitlines()]
    for line in lines:
        if line["split"] == "test":
            line["messages"][0]["content"] = line["messages"][0]["content"].replace(" + ", " plus ")
    path = tiny_suite.with_name("split-suite.jsonl")
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_calibrate_then_eval_end_to_end(tiny_bundles, tmp_path, tiny_suite, capsys, monkeypatch):
    from edge_runtime.bundle import load_manifest

    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    edge, cloud = tiny_bundles("llama", "fp32"), tiny_bundles("qwen2", "fp32")
    out = tmp_path / "estimator.json"
    assert main(["calibrate", "--bundle", str(edge), "--suite", str(tiny_suite), "--out", str(out), "--family", "multi", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 12 and out.exists() and 0 <= summary["parse_errors"] <= 12
    assert json.loads(out.read_text())["bundle_hash"]
    assert main(["eval", "--bundle", str(edge), "--cloud-bundle", str(cloud), "--suite", str(tiny_suite),
                 "--estimator", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["parse_errors"]) == {"edge", "cloud"} and 0 <= report["local_accuracy"] <= 1
    # which bundles answered, by the hash their runs are cached under (QA QQ: a figure could not be traced)
    assert (report["bundle_hash"], report["cloud_bundle_hash"]) == (load_manifest(edge).bundle_hash,
                                                                    load_manifest(cloud).bundle_hash)
    overall = report["estimators"]["multi"]["overall"]
    assert overall["n"] == 12 and set(overall) >= {"auroc", "ece", "apgr", "cpt", "random", "oracle"}
    # the table prints both; rounded to four digits first, 150/578 printed 25.9% above it and 26.0% below
    assert report["local_accuracy"] == pytest.approx(overall["local_accuracy"], abs=1e-6)
    assert set(report["estimators"]["multi"]) == {"overall", "arith", "words"}
    # the same estimator refuses another bundle
    assert main(["eval", "--bundle", str(cloud), "--suite", str(tiny_suite), "--estimator", str(out)]) == 1
    assert "another bundle" in capsys.readouterr().err
    # with prompt lookup the edge answers are decoded with drafts and cached apart; the cloud stand-in decodes
    # as a bridge does, without, so its cached answers are the ones above
    runs = tmp_path / "cache" / "runs"
    cloud_before = {p.name: p.stat().st_size for p in runs.glob("cloud-*")}
    assert main(["eval", "--bundle", str(edge), "--cloud-bundle", str(cloud), "--suite", str(tiny_suite),
                 "--estimator", str(out), "--json", "--prompt-lookup", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_lookup"] == 3
    assert {p.name: p.stat().st_size for p in runs.glob("cloud-*")} == cloud_before
    assert len([p for p in runs.glob("edge-*-lookup3-*")]) == 1 and "prompt_lookup" not in report
    # a cloud prior records the model it describes, as a bridge serving that bundle names it (the runtime checks it)
    with_prior = tmp_path / "with-prior.json"
    assert main(["calibrate", "--bundle", str(edge), "--cloud-bundle", str(cloud), "--suite", str(tiny_suite),
                 "--out", str(with_prior), "--family", "multi"]) == 0
    manifest = load_manifest(cloud)
    assert json.loads(with_prior.read_text())["meta"]["cloud_model"] == {
        "model": manifest.name, "revision": manifest.bundle_hash, "files_revision": manifest.legacy_bundle_hash}
    assert load_estimator(with_prior).cloud is not None and "cloud_model" not in json.loads(out.read_text())["meta"]
    # QA EEE: cloud runs that failed (here a stand-in whose context is too short for some prompts) were counted as
    # wrong answers: eval's cloud accuracy and calibrate's cloud prior were computed on them, exit 0
    import shutil

    short = tmp_path / "short-cloud"
    shutil.copytree(cloud, short)
    manifest_path = short / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["model"]["context_length"] = 48
    manifest_path.write_text(json.dumps(raw))
    for command in (["eval", "--json"], ["calibrate", "--family", "multi", "--out", str(tmp_path / "short.json")]):
        assert main([command[0], "--bundle", str(edge), "--cloud-bundle", str(short), "--suite", str(tiny_suite),
                     *command[1:]]) == 1
        assert "cloud runs failed" in capsys.readouterr().err
    assert not (tmp_path / "short.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["calibrate", "--family", "banana", "--out", "{tmp}/e.json"], "unknown estimator family 'banana'"),
        (["calibrate", "--family", "signal:nosuch", "--out", "{tmp}/e.json"], "unknown feature in 'signal:nosuch'"),
        (["calibrate", "--out", "{tmp}"], "--out: {tmp} is a directory"),
        (["calibrate", "--out", "{tmp}/no/such/dir/e.json"], "--out: the directory {tmp}/no/such/dir does not exist"),
        (["calibrate", "--out", "/proc/e.json"], "--out: cannot write in /proc"),  # found only after the split ran
        (["calibrate", "--limit", "0", "--out", "{tmp}/e.json"], "--limit: must be a positive number of items"),
        (["eval", "--limit", "-5"], "--limit: must be a positive number of items"),
        (["eval", "--study", "--estimator", "{tmp}/e.json"], "--estimator: --study fits every estimator family"),
        (["eval", "--split", "dev", "--suite", "{tmp}/test-only.jsonl"], "--split: the dev split of suite"),
        (["eval", "--cloud-bundle", "nosuch-bundle"], "--cloud-bundle"),
        (["calibrate", "--cloud-bundle", "nosuch-bundle", "--out", "{tmp}/e.json"], "--cloud-bundle"),
    ],
)
def test_calibrate_and_eval_refuse_bad_arguments_before_running_the_model(tiny_bundle, tmp_path, tiny_suite, capsys,
                                                                          monkeypatch, args, expected):
    import edge_runtime.engine

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(edge_runtime.engine, "Engine", no_model)
    rows = [json.loads(line) for line in tiny_suite.read_text().splitlines()]
    (tmp_path / "test-only.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == "test"))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    suite = [] if "--suite" in args else ["--suite", str(tiny_suite)]
    assert main([*args, "--bundle", str(tiny_bundle), *suite]) == 1
    err = capsys.readouterr().err
    assert expected.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err, err


@pytest.mark.parametrize(("args", "expected"), [
    (["calibrate", "--out", "{tmp}/e.json", "--threads", "0"], "--threads: must be an integer from 1 to 1024, got 0"),
    (["eval", "--prompt-lookup", "-1"], "--prompt-lookup: must be an integer from 0 to"),
    (["calibrate", "--out", "{tmp}/e.json", "--family", "foo"], "--family: unknown estimator family 'foo'"),
])
def test_errors_of_settings_passed_on_name_the_flag(tiny_bundle, tmp_path, tiny_suite, capsys, args, expected):
    # they named the engine's settings (intra_op_threads, prompt_lookup) and the fit's (family)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([*args, "--bundle", str(tiny_bundle), "--suite", str(tiny_suite)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_eval_reads_the_estimator_before_running_the_split(tiny_bundle, tmp_path, tiny_suite, capsys, monkeypatch):
    import edge_runtime.runs

    def no_runs(*a, **k):
        raise AssertionError("the split ran")

    monkeypatch.setattr(edge_runtime.runs, "run_edge", no_runs)
    assert main(["eval", "--bundle", str(tiny_bundle), "--suite", str(tiny_suite),
                 "--estimator", str(tmp_path / "typo.json")]) == 1
    err = capsys.readouterr().err
    assert "estimator file not found" in err and "Traceback" not in err


def test_an_estimator_using_a_feature_this_runtime_lacks_is_refused_at_load(tmp_path):
    model = fit_logistic(np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]), np.array([0.0, 1.0, 1.0]), ("lp_mean", "nosuchfeature"))
    path = tmp_path / "e.json"
    save_estimator(LogisticEstimator("x", model), path)
    with pytest.raises(EstimatorError, match="nosuchfeature"):
        load_estimator(path)


def test_in_sample_scores_leave_each_row_out_of_its_own_knn_prior():
    from edge_runtime.confidence import estimator_scores, fit_estimator
    from edge_runtime.confidence._fit import Dataset

    prompts = ["is 7 prime", "is 9 prime", "capital of peru", "capital of chad", "2 plus 2", "3 plus 3"] * 3
    labels = np.array([1, 1, 0, 0, 1, 0] * 3, float)
    signals = [Signals(prompt=p, text="x", token_texts=["x"], logprobs=[-0.5], entropies=[1.0], margins=[0.5],
                       finish_reason="eos", prompt_tokens=4, prompt_nll=2.0) for p in prompts]
    data = Dataset(signals, labels, [{"item_id": str(i)} for i in range(len(prompts))])
    est = fit_estimator("knn", data, bundle_hash=None, encoder=FakeEncoder(), k=3)
    with_self = estimator_scores(est, data)
    left_out = estimator_scores(est, data, training_data=True)
    assert left_out.tolist() == [est.knn.prior_from_embedding(e, exclude=i) for i, e in enumerate(data.embeddings(FakeEncoder()))]
    assert not np.allclose(with_self, left_out)  # its own label no longer votes



def test_metrics_undefined_on_one_class_are_null_in_json_not_nan():
    from edge_runtime.cli.calibrate import _json_safe

    out = _json_safe({"auroc": float("nan"), "ece": 0.1, "per": [float("inf"), np.float64("nan"), 2]})
    assert json.loads(json.dumps(out, allow_nan=False)) == {"auroc": None, "ece": 0.1, "per": [None, None, 2]}


def test_selfcheck_still_answers_when_the_conversation_filled_the_context_window(tiny_bundle, tmp_path, capsys):
    from edge_runtime.confidence import SelfCheckEstimator, signals_from_result
    from edge_runtime.confidence._selfcheck import selfcheck_messages
    from edge_runtime.engine import Engine
    from edge_runtime.errors import ContextLengthError

    engine = Engine(tiny_bundle, energy_meter=None)
    words = 1
    while engine.count_tokens(messages=[{"role": "user", "content": "count: " + "one two " * (words + 1)}]) < engine.context_length - 24:
        words += 1
    messages = [{"role": "user", "content": "count: " + "one two " * words}]
    room = engine.context_length - engine.count_tokens(messages=messages)
    assert 0 < room < 64
    result = engine.generate(messages=messages, max_new_tokens=room)  # the answer takes the rest of the window
    asked = selfcheck_messages(messages, result.text)
    with pytest.raises(ContextLengthError):  # the question no longer fits after the answer
        engine.next_token_logprobs(messages=asked)
    kept = engine.next_token_logprobs(messages=asked, truncate=True)  # the conversation's end, with the question
    assert kept.shape == (engine.model.vocab_size,) and math.isclose(float(np.exp(kept).sum()), 1.0, rel_tol=1e-4)
    p = SelfCheckEstimator(1.0, 0.0).p_correct(signals_from_result(result, messages=messages), engine=engine, messages=messages)
    assert 0.0 < p < 1.0

    # and so the CLI returns that answer with its confidence instead of a context-length error
    est = tmp_path / "selfcheck.json"
    save_estimator(SelfCheckEstimator(1.0, 0.0), est)
    lines = tmp_path / "in.jsonl"
    lines.write_text(json.dumps({"id": "full", "messages": messages, "max_new_tokens": room}) + "\n")
    assert main(["generate", str(tiny_bundle), "--input", str(lines), "--estimator", str(est), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == result.text and out["confidence"]["estimator"] == "selfcheck"
    assert 0.0 < out["confidence"]["p_correct"] < 1.0


@pytest.mark.parametrize("change, named", [({"k": 0}, "knn.k"), ({"k": "15"}, "knn.k"), ({"encoder": "bert-base"}, "knn.encoder"),
                                           ({"labels": [0, 2, 1]}, "knn.labels")])
def test_a_knn_estimator_with_a_meaningless_prior_is_refused_at_load(tmp_path, change, named):
    from edge_runtime.confidence import KnnEstimator, KnnPrior

    prior = KnnPrior(np.eye(3, ENCODER_DIM, dtype=np.float32), np.array([0.0, 1.0, 1.0]), k=2)
    path = tmp_path / "e.json"
    save_estimator(KnnEstimator(prior), path)
    assert load_estimator(path).knn.k == 2  # as written, it loads
    doc = json.loads(path.read_text())
    doc["knn"].update(change)
    path.write_text(json.dumps(doc))
    with pytest.raises(EstimatorError, match=named):
        load_estimator(path)


def test_calibrate_prints_its_summary_when_auroc_is_undefined(tiny_bundle, tmp_path, tiny_suite, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    rows = [json.loads(line) for line in tiny_suite.read_text().splitlines()]
    for r in rows:
        r["answers"] = ["987654321987"]  # every answer wrong: one class, AUROC undefined
    suite = tmp_path / "wrong.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "e.json"
    assert main(["calibrate", "--bundle", str(tiny_bundle), "--suite", str(suite), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "in-sample AUROC —" in printed and out.exists()


def test_a_study_on_the_split_it_fits_on_warns(tiny_bundle, tmp_path, tiny_suite, caplog, monkeypatch):
    import edge_runtime.runs
    from edge_runtime.errors import EdgeRuntimeError

    def stop(*a, **k):
        raise EdgeRuntimeError("stopped here")  # the warning comes before any run; no need to run the split

    monkeypatch.setattr(edge_runtime.runs, "run_edge", stop)
    assert main(["eval", "--study", "--split", "dev", "--bundle", str(tiny_bundle), "--suite", str(tiny_suite)]) == 1
    assert any("in-sample" not in r.getMessage() and "items it was fitted on" in r.getMessage() for r in caplog.records)


def test_eval_knows_in_sample_scoring_by_the_questions_not_the_suites_name(tiny_bundles, tmp_path, split_suite, caplog,
                                                                            capsys, monkeypatch):
    # told by the suite's name, a copy of the file (or ./a.jsonl for a.jsonl, or the built-in "arithmetic" for
    # "default") scored the fitted items unwarned
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    edge = tiny_bundles("llama", "fp32")
    out = tmp_path / "estimator.json"
    assert main(["calibrate", "--bundle", str(edge), "--suite", str(split_suite), "--out", str(out), "--family",
                 "knn"]) == 0
    copy = tmp_path / "renamed.jsonl"
    copy.write_bytes(split_suite.read_bytes())
    for split, warned in (("dev", True), ("test", False)):
        caplog.clear()
        assert main(["eval", "--bundle", str(edge), "--suite", str(copy), "--split", split,
                     "--estimator", str(out), "--json"]) == 0
        assert ("fitted on 12 of these 12 items" in caplog.text) == warned, caplog.text
    capsys.readouterr()


def test_eval_on_the_split_an_estimator_was_fitted_on_warns_and_a_failed_write_keeps_the_old_file(
        tiny_bundles, tmp_path, split_suite, capsys, caplog, monkeypatch):
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    edge = tiny_bundles("llama", "fp32")
    out = tmp_path / "estimator.json"
    assert main(["calibrate", "--bundle", str(edge), "--suite", str(split_suite), "--out", str(out), "--family",
                 "knn"]) == 0
    capsys.readouterr()
    # calibrate fits on dev; --split all holds the dev items too (it read AUROC 0.936 there, 0.742 on test, unwarned)
    for split, warned in (("dev", True), ("test", False), ("all", True)):
        caplog.clear()
        assert main(["eval", "--bundle", str(edge), "--suite", str(split_suite), "--split", split,
                     "--estimator", str(out), "--json"]) == 0
        assert ("in-sample" in caplog.text) == warned, caplog.text
    capsys.readouterr()
    # an estimator fitted on every split is in-sample on any of them
    fitted_on_all = tmp_path / "estimator-all.json"
    assert main(["calibrate", "--bundle", str(edge), "--suite", str(split_suite), "--split", "all", "--out",
                 str(fitted_on_all), "--family", "knn"]) == 0
    caplog.clear()
    assert main(["eval", "--bundle", str(edge), "--suite", str(split_suite), "--split", "test",
                 "--estimator", str(fitted_on_all), "--json"]) == 0
    assert "in-sample" in caplog.text, caplog.text
    capsys.readouterr()
    # a write cut short (a full disk) left invalid JSON where the previous estimator was
    from edge_runtime.confidence import load_estimator, save_estimator
    from edge_runtime.errors import EstimatorError

    before = out.read_bytes()
    estimator = load_estimator(str(out))

    def full(self, *_a, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(out), "write_text", full)
    with pytest.raises(EstimatorError, match=f"cannot write {out}: No space left on device"):
        save_estimator(estimator, out)
    monkeypatch.undo()
    assert out.read_bytes() == before and [p.name for p in tmp_path.glob(".estimator.json*")] == []


def test_few_items_are_said_to_be_few():
    # a team's first suite: 18 dev items for 29 features fitted to in-sample AUROC 1.000, then p_correct 0.99 when wrong
    from edge_runtime.confidence import FEATURES, fit_warnings, fitted_features, half_width_95, wilson_interval

    lo, hi = wilson_interval(10 / 14, 14)
    assert 0.45 < lo < 0.47 and 0.87 < hi < 0.89  # 71.4% on 14 items: anywhere from ~46% to ~88%
    assert wilson_interval(0.0, 5)[0] == 0.0 and wilson_interval(1.0, 5)[1] == 1.0
    assert half_width_95(14) == pytest.approx(0.262, abs=1e-3)
    assert fitted_features("multi") == len(FEATURES) and fitted_features("multi+knn") == len(FEATURES) + 1
    assert fitted_features("generic") == 6 and fitted_features("knn") is None and fitted_features("lp_min") == 1
    labels = np.array([1.0, 0.0] * 9)
    (warning,) = fit_warnings(labels, len(FEATURES))
    assert f"9 wrong answers among 18 items for {len(FEATURES)} features" in warning
    assert fit_warnings(np.array([1.0, 0.0] * 150), len(FEATURES)) == []
    # many items, few wrong ones: it is the rarer class the fit must tell apart (noise reached AUROC 0.97 here)
    (warning,) = fit_warnings(np.array([1.0] * 142 + [0.0] * 8), len(FEATURES))
    assert "8 wrong answers among 150 items" in warning
    (warning,) = fit_warnings(np.ones(5), 6)
    assert "all 5 items are right" in warning


def test_an_estimator_calibrated_before_the_bundle_hash_covered_the_manifest_is_used_with_a_warning(tmp_path, caplog):
    """Earlier versions hashed a bundle's files alone; their estimator files record that hash. Refusing them would
    stop every daemon at its upgrade: they load for the bundle whose files they were fitted on, saying why to
    recalibrate, and are bound to its hash from then on (no second warning from the runtime)."""
    model = fit_logistic(np.array([[0.0], [1.0], [0.2], [0.9]]), np.array([0, 1, 0, 1.0]), ("lp_mean",))
    path = tmp_path / "est.json"
    save_estimator(LogisticEstimator("signal:lp_mean", model, bundle_hash="a" * 64), path)
    with caplog.at_level("WARNING", logger="edge_runtime.confidence"):
        est = load_estimator(path, bundle_hash="n" * 64, legacy_hash="a" * 64)
    assert est.bundle_hash == "n" * 64
    assert any("earlier edge-runtime" in r.getMessage() and "manifest.json" in r.getMessage()
               and "records aaaaaaaaaaaa…" in r.getMessage() and "now nnnnnnnnnnnn…" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    check_bundle_hash(est.bundle_hash, "n" * 64, legacy_hash="a" * 64)
    assert not caplog.records


def test_a_steep_selfcheck_fit_gives_a_probability_at_a_low_p_yes():
    # a = 70 overflowed math.exp at P(yes) = 1e-4: the answers the check judged most likely wrong lost their estimate
    from edge_runtime.confidence import SelfCheckEstimator

    steep = SelfCheckEstimator(69.7, -170.3)
    assert steep.from_p_yes(1e-4) == pytest.approx(0.0, abs=1e-12)
    assert steep.from_p_yes(1.0) == pytest.approx(1.0)


def test_a_reply_with_no_text_scores_0_in_replay_and_generate_as_live(tiny_bundle, capsys):
    """QA 7: the hybrid runtime scores a reply with no text 0 (it escalates it), but the explorer's replay and eval
    (estimator_scores) gave it the estimator's own figure, 0.955 from the built-in default for an eos at once, and
    predicted it kept local: the explorer's figures were not the daemon's. generate --json printed it too."""
    from edge_runtime.confidence import estimator_scores, no_answer
    from edge_runtime.confidence._fit import Dataset
    from edge_runtime.engine import Engine
    from edge_runtime.hybrid import HybridRuntime

    empty = Signals(prompt="What is 37 + 48?", text="", token_texts=[""], logprobs=[-0.05], entropies=[0.3], margins=[0.9],
                    finish_reason="eos", prompt_tokens=12, prompt_nll=None)
    blank = Signals(prompt="What is 37 + 48?", text=" \n", token_texts=[" \n", ""], logprobs=[-0.1, -0.05],
                    entropies=[0.3, 0.3], margins=[0.9, 0.9], finish_reason="eos", prompt_tokens=12, prompt_nll=None)
    answer = _signals("What is 37 + 48?", ["8", "5", "<eos>"], [-1.0, -0.5, -0.2])
    estimator = load_estimator(None)
    assert estimator.p_correct(empty) > 0.5  # what its features alone say
    data = Dataset([empty, blank, answer], np.array([0.0, 0.0, 1.0]), [{}, {}, {}])
    scores = estimator_scores(estimator, data)
    assert scores[0] == scores[1] == 0.0 and scores[2] == pytest.approx(estimator.p_correct(answer))
    assert no_answer("") and no_answer(" \n") and not no_answer("4")

    engine = Engine(tiny_bundle, energy_meter=None)
    try:
        runtime = HybridRuntime(engine, policy={"type": "never"})
        ask = [{"role": "user", "content": "What is 12 + 7?"}]
        first = engine.generate(messages=ask, max_new_tokens=4).text
        assert runtime.chat(ask, max_new_tokens=4, stop=[first[:1]]).p_correct == 0.0
    finally:
        engine.close()
    assert main(["generate", str(tiny_bundle), "--chat", "What is 12 + 7?", "--max-new-tokens", "4", "--stop", first[:1],
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "" and out["confidence"]["p_correct"] == 0.0
