"""Design-space explorer: replay arithmetic by hand, the frontier, goals, resuming, and a real end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.errors import BundleError, ConfigError, InvalidRequestError
from edge_runtime.explore._goals import config_snippet, parse_goal, recommend, toml_value
from edge_runtime.explore._space import Point, _summary, pareto_front
from edge_runtime.policies import ReplayRecords, replay
from edge_runtime.runs import run_edge

# five cached runs, numbers chosen to be checked by hand
P = [0.9, 0.2, 0.6, 0.1, 0.4]
LOCAL_OK = [1, 0, 1, 0, 0]
CLOUD_OK = [1, 1, 0, 1, 0]
USD = [0.001, 0.002, 0.003, 0.004, 0.005]
JOULES = [2.0, 4.0, 6.0, 8.0, 10.0]
PREFILL_J = [1.0, 1.0, 1.0, 1.0, 1.0]
LOCAL_MS = [100.0, 200.0, 300.0, 400.0, 500.0]
PREFILL_MS = [10.0, 10.0, 10.0, 10.0, 10.0]
CLOUD_MS = [50.0, 60.0, 70.0, 80.0, 90.0]
NET_J = np.array([0.5] * 5)


def _records(**extra) -> ReplayRecords:
    return ReplayRecords(p_correct=P, local_correct=LOCAL_OK, cloud_correct=CLOUD_OK, cloud_usd=USD, local_joules=JOULES,
                         local_prefill_joules=PREFILL_J, local_ms=LOCAL_MS, local_prefill_ms=PREFILL_MS, cloud_ms=CLOUD_MS,
                         token_logprobs=[[-0.1, -0.1, -0.1, -0.1]] * 4 + [[-0.1, -3.0, -3.0, -3.0]], **extra)


def test_threshold_replay_by_hand():
    # p < 0.5 escalates items 1, 3, 4
    s = _summary(replay({"type": "threshold", "p": 0.5}, _records()), NET_J)
    assert s["escalation_rate"] == pytest.approx(3 / 5)
    assert s["accuracy"] == pytest.approx((1 + 1 + 1 + 1 + 0) / 5)  # local 0, 2 right; cloud 1, 3 right, 4 wrong
    assert s["cloud_usd_per_1k"] == pytest.approx((0.002 + 0.004 + 0.005) / 5 * 1000)
    # decoded locally in full everywhere, plus the radio for the three escalations
    assert s["device_j_per_request"] == pytest.approx((2 + 4 + 6 + 8 + 10 + 3 * 0.5) / 5)
    # latency: local, or local then cloud: 100, 260, 300, 480, 590
    assert s["latency_p50_ms"] == pytest.approx(300.0)


def test_early_exit_replay_charges_only_the_decoded_share():
    cfg = {"chain": [{"type": "early_exit", "bar": 0.5, "min_tokens": 2, "signal": "min_prob"}, {"type": "threshold", "p": 0.0}]}
    result = replay(cfg, _records())
    assert result.routes() == ["local", "local", "local", "local", "cloud"]
    # item 4 stops after its 2nd token (exp(-3) < 0.5): prefill 1 J + decode (10 - 1) * 2/4 tokens
    assert result.local_joules[4] == pytest.approx(1.0 + 9.0 * 2 / 4)
    assert result.latency_ms[4] == pytest.approx(10.0 + 490.0 * 2 / 4 + 90.0)


def test_gain_replay_uses_the_cloud_prior():
    records = _records(p_cloud=[0.5, 0.9, 0.1, 0.8, 0.3])
    result = replay({"type": "gain", "min_gain": 0.2}, records)
    assert result.routes() == ["local", "cloud", "local", "cloud", "local"]  # gains -0.4, 0.7, -0.5, 0.7, -0.1
    assert result.correct.tolist() == [True, True, True, True, False]


def _point(name, acc, usd, j, ms):
    o = {"accuracy": acc, "cloud_usd_per_1k": usd, "device_j_per_request": j, "latency_p50_ms": ms, "escalation_rate": 0.0,
         "latency_p95_ms": ms, "n": 10}
    return Point(name=name, family=name, config={"type": "never"}, overall=o, by_family={"f": o})


def test_frontier_is_non_dominated_and_complete():
    rng = np.random.default_rng(0)
    points = [_point(f"p{i}", *rng.random(4)) for i in range(60)] + [_point("dup", 0.5, 0.5, 0.5, 0.5), _point("dup2", 0.5, 0.5, 0.5, 0.5)]
    front = pareto_front(points)

    def dominates(a, b):
        va = np.array([-a.overall["accuracy"], a.overall["cloud_usd_per_1k"], a.overall["device_j_per_request"], a.overall["latency_p50_ms"]])
        vb = np.array([-b.overall["accuracy"], b.overall["cloud_usd_per_1k"], b.overall["device_j_per_request"], b.overall["latency_p50_ms"]])
        return (va <= vb).all() and (va < vb).any()

    for p in front:
        assert not any(dominates(q, p) for q in points)
    for p in points:
        if p not in front and p.name != "dup2":
            assert any(dominates(q, p) for q in front)
    assert sum(p.name.startswith("dup") for p in front) <= 1


@pytest.mark.parametrize(("goal", "message"), [
    ("", "empty goal"),
    ("accuracy>0.9", "cannot read"),
    ("usd<=0.5", "per 1,000 requests"),
    ("accuracy<=0.9", "accuracy takes >="),
    ("joules<=2*cloud", "only accuracy can be relative"),
    ("max-accuracy", "needs at least one constraint"),
    ("accuracy>=1.5", "fraction"),
])
def test_goal_errors_are_clear(goal, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_goal(goal)
    assert info.value.field == "goal"


def test_goals_pick_the_cheapest_or_the_most_accurate():
    points = [_point("local", 0.3, 0.0, 1.0, 100), _point("cloud", 0.5, 1.0, 0.1, 50), _point("mix", 0.49, 0.4, 0.8, 90),
              _point("mix2", 0.45, 0.2, 0.9, 95)]
    base = {"cloud": 0.5, "local": 0.3}
    assert recommend(parse_goal("accuracy>=0.95*cloud"), points, base).name == "mix"
    assert recommend(parse_goal("max-accuracy usd<=0.30/1k"), points, base).name == "mix2"
    assert recommend(parse_goal("max-accuracy joules<=0.5"), points, base).name == "cloud"
    assert recommend(parse_goal("accuracy>=0.9"), points, base) is None


def test_recommended_snippet_loads_in_the_daemon_settings(tmp_path):
    from edge_runtime.settings import load_runtime_settings

    point = Point(name="x", family="budget+threshold", overall={"accuracy": 0.4, "escalation_rate": 0.2, "cloud_usd_per_1k": 0.1},
                  config={"chain": [{"type": "budget", "usd": 0.01, "period_s": 10 ** 9}, {"type": "threshold", "p": 0.3}]})
    text = config_snippet(point, estimator_path=str(tmp_path / "estimator.json"), n_items=100, requests_per_day=5000, goal="g")
    path = tmp_path / "rec.toml"
    path.write_text(text)
    settings = load_runtime_settings(path, env={})
    assert settings.policy["chain"][0] == {"type": "budget", "usd": 0.5, "period_s": 86400}  # 0.01 per 100 requests at 5000/day
    assert settings.engine.estimator == tmp_path / "estimator.json"
    assert settings.engine.max_new_tokens == 64  # the length the answers were measured at, not the daemon's 256
    assert "[cost]" not in text
    # the cost model the points were priced with goes along, so the daemon reports what was predicted
    from edge_runtime.cost import CostSettings

    cost = CostSettings(network="cellular", electricity_usd_per_kwh=0.12)
    path.write_text(config_snippet(point, estimator_path=str(tmp_path / "estimator.json"), n_items=100,
                                   requests_per_day=5000, goal="g", cost=cost))
    loaded = load_runtime_settings(path, env={}).cost
    assert (loaded.network, loaded.electricity_usd_per_kwh, loaded.network_j_per_kb) == ("cellular", 0.12, None)
    assert "[cost]" not in config_snippet(point, estimator_path="e.json", n_items=1, requests_per_day=1, goal="g",
                                          cost=CostSettings())


def test_recommended_snippet_names_the_bundle_and_the_bridge(tmp_path):
    from edge_runtime.cloud import CloudSettings
    from edge_runtime.explore import _cloud_toml, _saved_cloud_toml
    from edge_runtime.settings import load_runtime_settings

    point = Point(name="x", family="threshold", overall={"accuracy": 0.4, "escalation_rate": 0.2, "cloud_usd_per_1k": 0.1},
                  config={"type": "threshold", "p": 0.3})
    bridge = CloudSettings(address="127.0.0.1:7001", token_file=tmp_path / "device.token", model="coder", insecure=True)
    cloud = _saved_cloud_toml(bridge, None, tmp_path / "device.token")
    assert _cloud_toml(bridge, tmp_path / "device.token", timeout=False) in cloud and "timeout_s" not in cloud
    text = config_snippet(point, estimator_path=str(tmp_path / "estimator.json"), n_items=100, requests_per_day=5000,
                          goal="g", bundle=str(tmp_path / "edge-bundle"), cloud=cloud)
    (tmp_path / "device.token").write_text("ebt_x\n")
    (tmp_path / "rec.toml").write_text(text)
    settings = load_runtime_settings(tmp_path / "rec.toml", env={})
    assert settings.engine.bundle == str(tmp_path / "edge-bundle") and settings.engine.prompt_lookup == 0
    assert (settings.cloud.address, settings.cloud.model, settings.cloud.token_file) == ("127.0.0.1:7001", "coder", tmp_path / "device.token")
    # a token given inline (not a file of the user's) is never written: the file says where one goes
    assert "# token_file" in _saved_cloud_toml(bridge, None, None)
    # answers measured with prompt-lookup drafts: the daemon decodes the same way
    (tmp_path / "rec.toml").write_text(config_snippet(point, estimator_path="e.json", n_items=1, requests_per_day=1, goal="g",
                                                      prompt_lookup=3))
    assert load_runtime_settings(tmp_path / "rec.toml", env={}).engine.prompt_lookup == 3


def test_daemon_warns_when_the_policy_may_escalate_but_no_bridge_is_configured(tiny_bundle, caplog):
    from edge_runtime.daemon._service import ChatService
    from edge_runtime.engine import Engine
    from edge_runtime.hybrid import HybridRuntime
    from edge_runtime.settings import load_runtime_settings

    engine = Engine(tiny_bundle, energy_meter=None)
    settings = load_runtime_settings(data={}, env={}).server
    for policy, warned in (({"type": "threshold", "p": 0.5}, True), ({"chain": [{"type": "privacy"}, {"type": "never"}]}, False)):
        caplog.clear()
        ChatService(settings).attach(HybridRuntime(engine, policy=policy))
        assert ("no [cloud] bridge is configured" in caplog.text) == warned


def test_daemon_warns_when_the_bridge_is_configured_without_a_device_token(tiny_bundle, caplog):
    from edge_runtime.cloud import CloudClient, CloudSettings
    from edge_runtime.daemon._service import ChatService
    from edge_runtime.engine import Engine
    from edge_runtime.hybrid import HybridRuntime
    from edge_runtime.settings import load_runtime_settings

    engine = Engine(tiny_bundle, energy_meter=None)
    settings = load_runtime_settings(data={}, env={}).server
    for token, warned in (("", True), ("ebt_x", False)):
        caplog.clear()
        client = CloudClient(CloudSettings(address="127.0.0.1:1", insecure=True, token=token))
        try:
            ChatService(settings).attach(HybridRuntime(engine, cloud=client))
        finally:
            client.close()
        assert ("no device token is configured" in caplog.text) == warned


def test_recommended_snippet_writes_numpy_values_from_the_search_grid_as_plain_toml(tmp_path):
    import numpy as np

    from edge_runtime.settings import load_runtime_settings

    point = Point(name="threshold(p=0.25)", family="threshold", overall={"accuracy": 0.4, "escalation_rate": 0.6, "cloud_usd_per_1k": 0.1},
                  config={"type": "threshold", "p": np.float64(0.25)})
    text = config_snippet(point, estimator_path=str(tmp_path / "estimator.json"), n_items=100, requests_per_day=5000, goal="g")
    assert "np." not in text
    path = tmp_path / "rec.toml"
    path.write_text(text)
    assert load_runtime_settings(path, env={}).policy == {"type": "threshold", "p": 0.25}
    assert (toml_value(np.int64(4)), toml_value(np.bool_(True)), toml_value(np.float32(0.5))) == ("4", "true", "0.5")


class _CountingEngine:
    """Wraps a real engine to count generations."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = 0
        self.model_name, self.bundle_hash, self.prompt_lookup = engine.model_name, engine.bundle_hash, engine.prompt_lookup
        self.energy_meter = engine.energy_meter

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.engine.generate(*args, **kwargs)


def test_an_interrupted_run_resumes_from_its_cache(tiny_bundle, tmp_path, tiny_suite):
    from edge_runtime.engine import Engine
    from edge_runtime.tasks import load_suite

    items = load_suite(tiny_suite, "test")
    engine = _CountingEngine(Engine(tiny_bundle, energy_meter=None))

    def interrupt(rec):
        if engine.calls == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_edge(engine, items, root=tmp_path, on_record=interrupt)
    cache_file = next(tmp_path.glob("edge-*.jsonl"))
    with cache_file.open("a") as fh:
        fh.write('{"item_id": "cut sh')  # a line cut short by the interruption
    records = run_edge(engine, items, root=tmp_path)
    assert engine.calls == len(items)  # the 3 done before the interruption were not run again
    assert [r["item_id"] for r in records] == [it.id for it in items]
    again = run_edge(engine, items, root=tmp_path)
    assert engine.calls == len(items) and again == records


def test_a_run_cache_line_cut_inside_a_character_or_edited_runs_that_item_again(tiny_bundle, tmp_path, tiny_suite):
    # QA XX: each of these was a traceback at every later eval, calibrate or explore run
    import json as _json

    from edge_runtime.engine import Engine
    from edge_runtime.runs import prompt_key
    from edge_runtime.tasks import load_suite

    items = load_suite(tiny_suite, "test")[:3]
    engine = _CountingEngine(Engine(tiny_bundle, energy_meter=None))
    first = run_edge(engine, items[:1], root=tmp_path)
    cache_file = next(tmp_path.glob("edge-*.jsonl"))
    with cache_file.open("ab") as fh:
        fh.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        fh.write(_json.dumps({"item_id": items[1].id, "prompt_key": prompt_key(items[1]), "text": 12345}).encode() + b"\n")
        fh.write(b'{"item_id": ["a"], "text": "x"}\n')
        fh.write(_json.dumps({"item_id": items[2].id, "prompt_key": prompt_key(items[2]), "text": "caf"}).encode()[:-3]
                 + "\u00e9".encode()[:1])  # an interrupted append of a non-ASCII answer
    records = run_edge(engine, items, root=tmp_path)
    assert engine.calls == 3 and records[0] == first[0]
    assert all(isinstance(r["text"], str) for r in records)
    assert run_edge(engine, items, root=tmp_path) == records and engine.calls == 3

def test_the_live_check_holds_back_a_share_of_every_family():
    # QA GGG: every 4th item of a 4-family suite taken in turns (--limit) was one family's, which the replay and its
    # recommendation then lacked; and 0.4, 0.6 and 0.9 all held back half
    from types import SimpleNamespace

    from edge_runtime.explore import _held_back

    items = [SimpleNamespace(id=f"{family}{r}", family=family) for r in range(20) for family in "abcd"]
    held = _held_back(items, 0.25)
    assert sorted(sum(h.family == family for h in held) for family in "abcd") == [5, 5, 5, 5]
    for fraction in (0.1, 0.4, 0.6, 0.9):
        assert len(_held_back(items, fraction)) == round(80 * fraction)
    # families smaller than 1 / fraction still give their share between them (review 31: a floor per family held
    # back nothing below --limit 28 on the built-in suites, and skipped the live check)
    small = [SimpleNamespace(id=f"{family}{r}", family=family) for r in range(3) for family in "abcdefg"]
    assert len(_held_back(small, 0.25)) == 5

def test_cached_runs_follow_the_items_not_just_their_ids(tiny_bundle, tmp_path, tiny_suite):
    import dataclasses

    from edge_runtime.engine import Engine
    from edge_runtime.runs import run_cloud
    from edge_runtime.tasks import load_suite

    items = load_suite(tiny_suite, "test")[:4]
    engine = _CountingEngine(Engine(tiny_bundle, energy_meter=None))
    first = run_edge(engine, items, root=tmp_path)
    # the same ids with other questions (an edited suite, or another suite reusing ids): run again
    other = [dataclasses.replace(it, messages=({"role": "user", "content": f"another question {i}"},))
             for i, it in enumerate(items)]
    run_edge(engine, other, root=tmp_path)
    assert engine.calls == 8
    # ... and each suite keeps its own answers: run in turn, neither runs again (QA QQ: one record per id made
    # each run of one suite answer the other's items again, and the file grew at every run)
    size = len(list(tmp_path.glob("edge-*.jsonl"))[0].read_text().splitlines())
    assert run_edge(engine, items, root=tmp_path) == first and run_edge(engine, other, root=tmp_path)
    assert engine.calls == 8 and len(list(tmp_path.glob("edge-*.jsonl"))[0].read_text().splitlines()) == size
    # the same questions with a corrected answer key: no new run, but scored against the new answers
    fixed = [dataclasses.replace(it, answers=(first[i]["text"].strip() or "x",), scorer="exact") for i, it in enumerate(items)]
    rescored = run_edge(engine, fixed, root=tmp_path)
    assert run_edge(engine, fixed, root=tmp_path) == rescored and engine.calls == 8
    assert all(r["correct"] for r in rescored if r["text"].strip())
    # moved to another family or split in the suite file: no new run, and reported where it is now
    moved = [dataclasses.replace(it, family="moved", split="dev") for it in fixed]
    assert {(r["family"], r["split"]) for r in run_edge(engine, moved, root=tmp_path)} == {("moved", "dev")}
    assert engine.calls == 8
    calls = []

    def cloud(item):
        calls.append(item.id)
        return {"text": item.answers[0], "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.0, "latency_ms": 1.0, "model": "m"}

    assert all(r["correct"] for r in run_cloud(cloud, "m", items, root=tmp_path))
    run_cloud(cloud, "m", other, root=tmp_path)
    assert len(calls) == 8
    run_cloud(cloud, "m", items, root=tmp_path)
    assert len(calls) == 8


@pytest.fixture()
def tiny_suite(tmp_path):
    lines = []
    for i in range(16):
        for split in ("dev", "test"):
            fam = ("arith", "words")[i % 2]
            lines.append({"id": f"{split}-{i}", "family": fam, "split": split,
                          "messages": [{"role": "user", "content": f"what is {i} + {i + 1}? give only the number."}],
                          "answers": [str(2 * i + 1)], "scorer": "number"})
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.slow
def test_explore_end_to_end_with_a_real_bridge_and_daemon(tiny_bundles, tiny_suite, tmp_path, monkeypatch):
    from edge_runtime.cost import CostSettings
    from edge_runtime.explore import explore
    from edge_runtime.power import PowerSettings

    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                     suite=str(tiny_suite), goals=["accuracy>=0.95*cloud", "max-accuracy usd<=0.01/1k"], validate=True,
                     root=tmp_path / "runs")
    for name in ("report.md", "points.csv", "frontier.csv", "estimator.json"):
        assert (out / name).is_file(), name
    # the cloud prior names the model the bridge served (a daemon warns when its bridge serves another)
    from edge_runtime.bundle import load_manifest

    served = load_manifest(tiny_bundles("qwen2", "fp32"))
    assert json.loads((out / "estimator.json").read_text())["meta"]["cloud_model"] == {
        "model": served.name, "revision": served.bundle_hash, "files_revision": served.legacy_bundle_hash}
    assert {"accuracy_vs_escalation.png", "accuracy_vs_usd.png", "accuracy_vs_joules.png"} <= {p.name for p in out.glob("*.png")}
    report = (out / "report.md").read_text()
    assert "always-local" in report and "Pareto frontier" in report and "Task dependence" in report and "ESTIMATE" in report
    # which bundles answered: the edge's hash and the revision the bridge named (QA QQ)
    edge_hash = load_manifest(tiny_bundles("llama", "fp32")).bundle_hash
    assert f"bundle hash `{edge_hash[:16]}`" in report and f"(revision `{served.bundle_hash[:16]}`)" in report
    # its own loopback bridge runs this onnxruntime: its cloud answers are cached per version, as edge runs are
    import onnxruntime

    runs = tmp_path / "runs"
    assert all(f"-ort{onnxruntime.__version__}" in p.name for p in [*runs.glob("cloud-*"), *runs.glob("edge-*")])
    assert list(runs.glob("cloud-*"))
    # the CSVs are read without the report: each row says where its joules come from
    import csv

    rows = list(csv.DictReader((out / "points.csv").read_text().splitlines()))
    assert rows and all(r["energy_estimated"] == "true" and r["energy_source"].startswith("estimate:") for r in rows)
    assert result.validation is not None and result.validation["n"] == 4  # every 4th of the 16 test items was held back
    # 4 items can confirm nothing, and 12 explored ones make every figure rough: both are said
    assert result.validation["verdict"] == "too few held-back items to tell"
    assert "**Few items (12).**" in report and "accuracy (95% interval)" in report
    assert result.recommendations[0]["config_file"] == "recommended.toml"
    from edge_runtime.settings import load_runtime_settings

    saved = load_runtime_settings(out / "recommended.toml", env={})  # the daemon loads it as is
    # with the edge bundle the estimator was fitted on; the explorer's own bridge is gone, so [cloud] is a commented template
    assert saved.engine.bundle == str(tiny_bundles("llama", "fp32").resolve()) and not saved.cloud.address
    assert Path(saved.engine.bundle).is_absolute()  # loads from any working directory, as the estimator's path
    template = (out / "recommended.toml").read_text()
    assert "# [cloud]" in template
    # uncommented as it says, it works against the bridge it describes (plaintext, on this machine) at the same prices
    assert "# insecure = true" in template and "cloud-bridge serve --config bridge.toml --insecure" in template
    assert "backend = \"onnx\"" in template
    assert "usd_per_million_input_tokens = " in template and "usd_per_million_output_tokens = " in template
    assert len(result.measurements.items) == 12
    # an escalation's device energy is the radio's and the device's idle draw while it waits, as live requests count it
    from edge_runtime.cost import idle_watts
    from edge_runtime.power import default_meter

    m = result.measurements
    waits_j = np.array([idle_watts(default_meter()) * c["latency_ms"] / 1000.0 for c in m.cloud])
    assert waits_j.min() > 0 and np.all(m.network_j > waits_j) and "idle draw while it waits" in report
    cloud_point = next(p for p in result.points if p.name == "always-cloud")
    assert cloud_point.overall["device_j_per_request"] == pytest.approx(float(m.network_j.mean()))
    assert not [p for p in out.rglob("*") if "token" in p.name]  # the bridge token never lands in the output directory
    # a second run replays from the cache: no new edge or bridge runs; cloud answers are billed at today's prices
    before = {p.name: p.stat().st_size for p in (tmp_path / "runs").iterdir()}
    dearer = CostSettings(prices={"*": {"input": 1500.0, "output": 6000.0}})  # 10,000 times the default
    again = explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                    suite=str(tiny_suite), goals=["max-accuracy joules<=100"], validate=True, root=tmp_path / "runs",
                    cost=dearer)
    assert {p.name: p.stat().st_size for p in (tmp_path / "runs").iterdir()} == before
    usd = result.point("always-cloud").overall["cloud_usd_per_1k"]
    assert usd > 0 and again.point("always-cloud").overall["cloud_usd_per_1k"] == pytest.approx(usd * 10_000)
    # another device profile measures energy otherwise: the edge runs again (the bridge's runs stay), and the
    # recommended config measures the same way
    third = explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                    suite=str(tiny_suite), validate=True, root=tmp_path / "runs",
                    power=PowerSettings(profile="raspberry-pi-5"))
    assert {e["energy_source"] for e in third.measurements.edge} == {"estimate:raspberry-pi-5"}
    after = {p.name: p.stat().st_size for p in (tmp_path / "runs").iterdir()}
    assert [n for n in after if after[n] != before[n]] == [n for n in before if n.startswith("edge")]
    assert load_runtime_settings(out / "recommended.toml", env={}).power.profile == "raspberry-pi-5"


@pytest.mark.slow
def test_explore_checks_the_first_goal_met_reports_every_goal_and_drops_stale_files(tiny_bundles, tiny_suite, tmp_path,
                                                                                   monkeypatch):
    from edge_runtime.explore import explore

    out = tmp_path / "out"
    out.mkdir()
    (out / "recommended-3.toml").write_text("# from an earlier run with three goals\n")
    (out / "recommended-prod.toml").write_text("# the user's own\n")  # not the explorer's: kept
    result = explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                     suite=str(tiny_suite), goals=["accuracy>=0.99", "max-accuracy usd<=1000/1k"], validate=True,
                     root=tmp_path / "runs", prompt_lookup=3)
    assert result.recommendations[0]["point"] is None and result.recommendations[1]["config_file"] == "recommended-2.toml"
    # the edge answers were decoded with drafts, cached apart, and the daemon of the live check decoded them so too
    assert [p.name for p in (tmp_path / "runs").glob("edge-*")] and all("-lookup3-" in p.name for p in (tmp_path / "runs").glob("edge-*"))
    assert "prompt_lookup = 3" in (out / "recommended-2.toml").read_text()
    assert sorted(p.name for p in out.glob("recommended*.toml")) == ["recommended-2.toml", "recommended-prod.toml"]
    assert result.validation is not None and "max-accuracy usd<=1000/1k" in result.validation["summary"]
    report = (out / "report.md").read_text()
    assert "Goal `accuracy>=0.99`: **no explored policy meets it**" in report
    assert "Goal `max-accuracy usd<=1000/1k`" in report and "could not read (counted wrong)" in report
    # a run without a live check leaves no earlier live check's config and log behind
    assert (out / "validate-daemon.toml").exists()
    explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
            suite=str(tiny_suite), goals=["accuracy>=0.99"], root=tmp_path / "runs", prompt_lookup=3)
    assert not list(out.glob("validate-daemon.*"))
    # a live check that fails leaves the replay's report and tables beside its recommendations (QA GGG: only
    # recommended.toml was left, still quoting the replay's accuracy)
    import edge_runtime.explore as explore_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("the daemon did not start")

    monkeypatch.setattr(explore_module, "_daemon", broken)
    with pytest.raises(RuntimeError, match="did not start"):
        explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                suite=str(tiny_suite), goals=["max-accuracy usd<=1000/1k"], validate=True, root=tmp_path / "runs",
                prompt_lookup=3)
    assert all((out / name).exists() for name in ("recommended.toml", "report.md", "points.csv", "frontier.csv"))
    assert "Live run of" not in (out / "report.md").read_text()
    assert "**The live check failed** (RuntimeError: the daemon did not start)" in (out / "report.md").read_text()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="cannot write to the output directory"):
        explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")),
                out=out / "report.md", suite=str(tiny_suite), root=tmp_path / "runs")
    with pytest.raises(ConfigError) as empty:  # an unset $OUT: Path("") is the working directory
        explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")),
                out="", suite=str(tiny_suite), root=tmp_path / "runs")
    assert empty.value.field == "out"
    # a run that fails partway (a full disk) leaves no earlier run's report beside its own recommendations
    import errno

    import edge_runtime.explore as explore_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    assert (out / "report.md").exists()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(explore_module, "write_plots", full)
        with pytest.raises(OSError):
            explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                    suite=str(tiny_suite), goals=["max-accuracy usd<=1000/1k"], root=tmp_path / "runs", prompt_lookup=3)
    assert not (out / "report.md").exists() and (out / "recommended.toml").exists()
    model_dir = tmp_path / "hf-model"  # a directory, but not a bundle: named, and no output directory made
    model_dir.mkdir()
    with pytest.raises(BundleError, match="^--edge: "):
        explore(edge=str(model_dir), cloud=str(tiny_bundles("qwen2", "fp32")), out=tmp_path / "never",
                suite=str(tiny_suite), root=tmp_path / "runs")
    assert not (tmp_path / "never").exists()
    with pytest.raises(InvalidRequestError) as info:
        explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                suite=str(tiny_suite), limit=0, root=tmp_path / "runs")
    assert info.value.field == "limit"
    with pytest.raises(ConfigError) as threads:  # it named the engine's intra_op_threads
        explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=out,
                suite=str(tiny_suite), threads=2000, root=tmp_path / "runs")
    assert threads.value.field == "--threads"


def test_an_external_bridge_alias_measured_is_the_model_the_saved_config_asks_for(tiny_bundle, tiny_suite, monkeypatch, tmp_path):
    """explore --cloud ALIAS --config edge.toml (no model there): the runs and the config must name the same alias."""
    import edge_runtime.explore as ex
    from edge_runtime.cloud import CloudSettings

    seen = {}

    def stop(settings):
        seen["settings"] = settings
        raise KeyboardInterrupt  # enough: what matters is the client the explorer measures with

    monkeypatch.setattr("edge_runtime.cloud.CloudClient", stop)
    settings = CloudSettings(address="127.0.0.1:7001", token="ebt_x", insecure=True)
    with pytest.raises(KeyboardInterrupt):
        ex.explore(edge=str(tiny_bundle), cloud="coder", out=tmp_path / "out", suite=str(tiny_suite), limit=2,
                   cloud_settings=settings, root=tmp_path / "runs")
    assert seen["settings"].model == "coder"


def test_an_alias_the_bridge_does_not_serve_fails_before_any_item_is_sent(tiny_bundle, tiny_suite, monkeypatch, tmp_path):
    from types import SimpleNamespace

    import edge_runtime.explore as ex
    from edge_runtime.cloud import CloudSettings

    class Client:
        def __init__(self, settings):
            self.sent = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def list_models(self):
            return [SimpleNamespace(alias="small", model="m", is_default=True, revision="")]

    monkeypatch.setattr("edge_runtime.cloud.CloudClient", Client)
    settings = CloudSettings(address="127.0.0.1:7001", token="ebt_x", insecure=True)
    with pytest.raises(ConfigError, match="serves no model alias 'coder' \\(it serves: small\\)"):
        ex.explore(edge=str(tiny_bundle), cloud="coder", out=tmp_path / "out", suite=str(tiny_suite), limit=2,
                   cloud_settings=settings, root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # not one item was run


def test_bridge_runs_are_keyed_by_the_revision_the_bridge_reports():
    """A rebuilt bundle behind a bridge must not be answered from the old bundle's cached runs."""
    from types import SimpleNamespace

    from edge_runtime.explore import _cloud_identity

    def client(revision: str, bundle_revision: str = "") -> SimpleNamespace:
        return SimpleNamespace(list_models=lambda: [SimpleNamespace(
            alias="coder", model="stand-in", is_default=True, revision=revision, bundle_revision=bundle_revision,
            usd_per_million_input_tokens=1.5, usd_per_million_output_tokens=6.0)])

    # an upstream API: its model name is all there is
    assert _cloud_identity(client(""), "coder") == ("bridge-coder-stand-in", (1.5, 6.0),
                                                    {"model": "stand-in", "revision": "", "files_revision": ""})
    assert _cloud_identity(client("0123456789abcdef0123"), "coder")[0] == "bridge-coder-stand-in-0123456789abcdef"
    assert _cloud_identity(client("0123456789abcdef0123"), "")[0] == "bridge-default-stand-in-0123456789abcdef"
    # a bridge that sends the whole bundle's hash (its manifest's chat template included): keyed by that
    key, _, served = _cloud_identity(client("0123456789abcdef0123", "fedcba9876543210ffff"), "coder")
    assert key == "bridge-coder-stand-in-fedcba9876543210" and served["revision"] == "fedcba9876543210ffff"


def test_a_bundle_that_is_not_found_names_the_option_it_came_from(tiny_bundle, tmp_path, capsys):
    from edge_runtime.cli import main

    out = str(tmp_path / "out")
    assert main(["explore", "--edge", "nosuch-edge", "--cloud", str(tiny_bundle), "--out", out, "--limit", "2"]) == 1
    assert "--edge: bundle not found: nosuch-edge" in capsys.readouterr().err
    # without a bridge, --cloud is a bundle: a model alias there gets told so
    assert main(["explore", "--edge", str(tiny_bundle), "--cloud", "coder", "--out", out, "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert "--cloud: bundle not found: coder" in err and "not a model alias" in err
    assert not (tmp_path / "out").exists()  # found out before anything was written: no empty directory left


@pytest.mark.parametrize(("flags", "said"), [
    (["--limit", "0"], "--limit: must be a positive number of items"),
    (["--goal", "nonsense"], "--goal: cannot read 'nonsense'"),
    (["--out", ""], "--out: is empty"),
])
def test_explores_errors_name_the_flag_typed(tiny_bundle, tmp_path, capsys, flags, said):
    # they named explore()'s arguments ("limit: ...", "out: ..."), which no user typed
    from edge_runtime.cli import main

    args = ["explore", "--edge", str(tiny_bundle), "--cloud", str(tiny_bundle), "--out", str(tmp_path / "out"), *flags]
    assert main(args) == 1
    assert f"error: {said}" in capsys.readouterr().err


def test_calibrate_and_eval_name_the_bundle_flag(tmp_path, capsys):
    from edge_runtime.cli import main

    assert main(["eval", "--bundle", "nosuch-edge"]) == 1
    assert "error: --bundle: bundle not found: nosuch-edge" in capsys.readouterr().err
    assert main(["calibrate", "--bundle", "nosuch-edge", "--out", str(tmp_path / "e.json")]) == 1
    assert "error: --bundle: bundle not found: nosuch-edge" in capsys.readouterr().err


def test_the_cloud_section_escapes_its_values(tmp_path):
    import tomllib

    from edge_runtime.cloud import CloudSettings
    from edge_runtime.explore import _cloud_toml

    text = _cloud_toml(CloudSettings(address="h:1"), Path("C:\\Users\\me\\tok \"1\""))
    assert tomllib.loads(text)["cloud"]["token_file"] == "C:\\Users\\me\\tok \"1\""


def test_the_plane_frontier_is_a_staircase_and_the_4d_one_ignores_float_noise():
    from edge_runtime.explore._report import _plane_front
    from edge_runtime.explore._space import Point, pareto_front

    def point(name, acc, usd, j=1.0, p50=100.0):
        m = {"accuracy": acc, "cloud_usd_per_1k": usd, "device_j_per_request": j, "latency_p50_ms": p50,
             "escalation_rate": 0.0}
        return Point(name=name, family="threshold", config={}, overall=m, by_family={})

    pts = [point("a", 0.30, 0.001), point("b", 0.25, 0.002), point("c", 0.40, 0.003), point("d", 0.35, 0.004)]
    assert [p.name for p in _plane_front(pts, "cloud_usd_per_1k")] == ["a", "c"]  # b and d are beaten in this plane
    twins = [point("p=0.5", 0.4, 0.001, j=1.2749458985), point("p=0.3", 0.4, 0.002, j=1.2749459611)]
    assert [p.name for p in pareto_front(twins)] == ["p=0.5"]  # same joules at the CSV's 6 digits: p=0.3 costs more


def test_the_summary_labels_every_energy_figure_that_is_estimated(tmp_path):
    import io
    from types import SimpleNamespace

    from edge_runtime.cli.explore import print_summary

    overall = {"accuracy": 0.5, "escalation_rate": 0.0, "cloud_usd_per_1k": 0.0, "device_j_per_request": 1.0,
               "latency_p50_ms": 10.0}
    points = {n: SimpleNamespace(name=n, overall=overall) for n in ("always-local", "always-cloud")}

    def summary(edge, files=("report.md", "points.csv", "accuracy_vs_cost.png")):
        out = io.StringIO()
        print_summary(SimpleNamespace(point=points.get, recommendations=[], validation=None, out=tmp_path,
                                      measurements=SimpleNamespace(edge=edge), files=list(files)), out)
        return out.getvalue()

    estimated = summary([{"energy_source": "estimate:generic", "energy_estimated": True}])
    assert "J/req is ESTIMATED (estimate:generic" in estimated
    assert f"plots and CSVs in {tmp_path}" in estimated
    # without matplotlib there are no plots: the last line promised them after the warning that said so
    assert f"; CSVs (no plots) in {tmp_path}" in summary([], files=("report.md", "points.csv"))
    # a counter measures the device, but the radio's share of an escalation is the cost model's, and the wait's
    # the device profile's
    measured = summary([{"energy_source": "rapl:package-0", "energy_estimated": False}])
    assert "measured (rapl:package-0)" in measured
    assert "network energy of each escalation and the device's idle power while it waits, ESTIMATED" in measured
    # a long policy name is shown whole (it lost its closing parenthesis at 44 characters), the columns aligned
    name = "early_exit(min_prob<0.2,k=2)+threshold(p=0.2)"
    points[name] = SimpleNamespace(name=name, overall=overall)
    out = io.StringIO()
    print_summary(SimpleNamespace(point=points.get, recommendations=[{"point": points[name], "goal": "g", "config_file": "g.toml"}],
                                  validation=None, out=tmp_path, measurements=SimpleNamespace(edge=[]), files=[]), out)
    rows = out.getvalue().splitlines()
    assert rows[3].startswith(name + " ") and len({r.index("50.0%") for r in rows[1:4]}) == 1


def test_an_item_the_model_cannot_take_is_named(tiny_bundle, tmp_path, tiny_suite):
    import dataclasses

    from edge_runtime.engine import Engine
    from edge_runtime.errors import ContextLengthError
    from edge_runtime.tasks import load_suite

    item = load_suite(tiny_suite, "test")[0]
    long = dataclasses.replace(item, messages=({"role": "user", "content": "word " * 400},))
    with pytest.raises(ContextLengthError, match=f"suite item {item.id!r}: messages: the prompt has"):
        run_edge(Engine(tiny_bundle, energy_meter=None), [long], root=tmp_path)


def test_the_explorers_runs_are_measured_again_by_another_meter_even_under_the_same_label(tiny_bundle, tmp_path,
                                                                                          tiny_suite):
    from edge_runtime.engine import Engine
    from edge_runtime.power import EnergyMeter, custom_profile
    from edge_runtime.tasks import load_suite

    items = load_suite(tiny_suite, "test")[:3]

    def engine(watts: float) -> _CountingEngine:
        meter = EnergyMeter(sysfs_root=tmp_path / "no-counters", profile=custom_profile("generic", active_watts_per_core=watts))
        return _CountingEngine(Engine(tiny_bundle, energy_meter=meter))

    one, fifty = engine(1.0), engine(50.0)
    first = run_edge(one, items, root=tmp_path, energy=True)
    assert run_edge(one, items, root=tmp_path, energy=True) == first and one.calls == 3  # the same meter: cached
    again = run_edge(fifty, items, root=tmp_path, energy=True)  # both label themselves estimate:custom
    assert fifty.calls == 3 and {r["energy_source"] for r in first + again} == {"estimate:custom"}
    assert {r["energy_meter"] for r in again} == {fifty.energy_meter.identity} != {one.energy_meter.identity}
    run_edge(one, items, root=tmp_path)  # a run that does not read energy (eval) takes either
    assert one.calls == 3


def test_an_estimate_cached_by_eval_is_measured_again_when_the_explorer_has_a_counter(tiny_bundle, tmp_path,
                                                                                      tiny_suite, monkeypatch):
    # calibrate and eval stamped no meter on their records, and an unstamped estimate counted as alike to any
    # meter's fallback: the explorer never measured those items with the device's RAPL counter
    from edge_runtime.engine import Engine
    from edge_runtime.power import EnergyMeter
    from edge_runtime.tasks import load_suite

    items = load_suite(tiny_suite, "test")[:2]
    estimating = _CountingEngine(Engine(tiny_bundle, energy_meter=EnergyMeter(sysfs_root=tmp_path / "no-counters")))
    eval_records = run_edge(estimating, items, root=tmp_path)  # what eval does: energy not asked for
    assert {r["energy_meter"] for r in eval_records} == {estimating.energy_meter.identity}
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "power"))
    from power_fakes import add_rapl_zone

    add_rapl_zone(tmp_path / "rapl", "0", "package-0", 1_000_000)
    counter = EnergyMeter(sysfs_root=tmp_path / "rapl")
    try:  # a counter's meter runs a sampler thread until closed
        measuring = _CountingEngine(Engine(tiny_bundle, energy_meter=counter))
        assert measuring.energy_meter.source == "rapl:package-0"
        run_edge(measuring, items, root=tmp_path, energy=True)
        assert measuring.calls == 2
    finally:
        counter.close()


def test_the_live_checks_daemon_reads_its_settings_from_its_config_only(tmp_path, monkeypatch):
    # the device token in EDGE_RUNTIME_CLOUD_TOKEN (as the help suggests) beside the config's token_file would be
    # a token and a token file, which settings refuse; EDGE_RUNTIME_POLICY=never made the check run "never" and
    # blame the recommendation; EDGE_RUNTIME_SERVER_PORT moved the daemon off the polled port (a 180 s hang)
    import contextlib

    from edge_runtime import explore as explore_module

    seen = {}

    @contextlib.contextmanager
    def fake_child(cmd, log_path, healthy, *, name, timeout_s, env):
        seen["env"] = env
        yield None

    monkeypatch.setattr(explore_module, "child_service", fake_child)
    monkeypatch.setenv("EDGE_RUNTIME_CLOUD_TOKEN", "ebt_from-the-environment")
    monkeypatch.setenv("EDGE_RUNTIME_POLICY", "never")
    monkeypatch.setenv("EDGE_RUNTIME_SERVER_PORT", "18556")
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGE_RUNTIME_UNRELATED_TOOL", "x")
    with explore_module._daemon("[cloud]\naddress = \"127.0.0.1:1\"\n", tmp_path):
        pass
    assert [k for k in seen["env"] if k.startswith("EDGE_RUNTIME_")] == ["EDGE_RUNTIME_CACHE"]
    assert seen["env"]["EDGE_RUNTIME_CACHE"] == str(tmp_path / "cache") and "PATH" in seen["env"]


@pytest.mark.parametrize("split", ["dev", "all"])
def test_exploring_items_the_estimator_was_fitted_on_warns_that_it_is_in_sample(tiny_bundles, tiny_suite, tmp_path,
                                                                               caplog, split):
    from edge_runtime.explore import explore

    explore(edge=str(tiny_bundles("llama", "fp32")), cloud=str(tiny_bundles("qwen2", "fp32")), out=tmp_path / "out",
            suite=str(tiny_suite), split=split, validate=False, root=tmp_path / "runs", limit=2)
    assert any("in-sample" in r.getMessage() for r in caplog.records)


def test_the_explorers_own_bridge_bills_at_the_price_named_for_its_model(tiny_bundles):
    # a [cost] table naming the model (as price_usd reads it), with no "*" entry: the loopback bridge used to bill 0
    from edge_runtime.bundle import load_manifest
    from edge_runtime.cloud import CloudClient
    from edge_runtime.cost import CostSettings
    from edge_runtime.explore import local_bridge

    bundle = tiny_bundles("qwen2", "fp32")
    cost = CostSettings(prices={load_manifest(bundle).name: {"input": 1000.0, "output": 2000.0}})
    with local_bridge(bundle, cost=cost) as (address, token):
        with CloudClient(address=address, token=token, insecure=True) as client:
            info = client.list_models()[0]
    assert (info.usd_per_million_input_tokens, info.usd_per_million_output_tokens) == (1000.0, 2000.0)


def test_the_explorers_own_bridge_refuses_a_price_table_without_its_model_or_a_star(tiny_bundles):
    # QA: a [cost] table naming only another model (the hosted one the user pays for) left the loopback bridge
    # billing USD 0 unsaid: always-cloud read 0.0000 USD/1k, no budget policy was explored, usd goals met freely
    from edge_runtime.cost import CostSettings
    from edge_runtime.explore import local_bridge

    bundle = tiny_bundles("qwen2", "fp32")
    with pytest.raises(ConfigError, match="no price for the cloud model") as err:
        with local_bridge(bundle, cost=CostSettings(prices={"gpt-4o-mini": {"input": 0.15, "output": 0.6}})):
            pass
    assert err.value.field == "cost.prices"
    # a free cloud said as such is taken
    with local_bridge(bundle, cost=CostSettings(prices={"*": {"input": 0, "output": 0}})):
        pass


def test_the_live_checks_agreement_test_calls_a_right_prediction_wrong_about_5_percent_of_the_time():
    import numpy as np

    from edge_runtime.explore._validate import agreement

    rng = np.random.default_rng(0)
    for p, n_pred, n_live in ((0.4, 434, 144), (0.55, 53, 17), (0.1, 200, 60)):
        wrong = sum(not agreement(rng.binomial(n_pred, p) / n_pred, rng.binomial(n_live, p) / n_live, n_live, n_pred)[0]
                    for _ in range(4000))
        assert 0.02 < wrong / 4000 < 0.08, (p, wrong / 4000)  # taking the prediction as exact gave 8-12%
    assert agreement(0.0, 1 / 17, 17, 53)[0]  # 0 of 53 replayed, 1 of 17 live: chance, not disagreement
    assert not agreement(0.4, 0.9, 144, 434)[0]


def test_run_caches_of_long_model_keys_that_differ_past_80_characters_are_apart(tmp_path):
    from edge_runtime.runs import RUN_SETTINGS, RunCache

    name = "a-very-long-bundle-name-" + "x" * 60
    one, other = (RunCache("edge", f"{name}-{h}", RUN_SETTINGS, root=tmp_path) for h in ("2c0914cb41238f47", "93185d6a6d0dff69"))
    assert one.path != other.path
    short = RunCache("edge", "smollm2-135m-instruct-93185d6a6d0dff69", RUN_SETTINGS, root=tmp_path)
    assert short.path.name.startswith("edge-smollm2-135m-instruct-93185d6a6d0dff69-")  # short keys keep their names
    # keys that differ only in a character a file name cannot hold: one file made the second model's
    # answers the first's (the second was never asked)
    slash, colon = (RunCache("cloud", f"bridge-default-acme{c}llm-7b", RUN_SETTINGS, root=tmp_path) for c in "/:")
    assert slash.path != colon.path


def test_a_goal_written_over_lines_is_one_line_in_the_configs_comment():
    # the second line of the goal text landed uncommented in recommended.toml, which serve then refused
    goal = parse_goal("max-accuracy\nusd<=0.03/1k")
    assert goal.text == "max-accuracy usd<=0.03/1k"


def test_an_output_directory_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch):
    from edge_runtime.explore import _make_out_dir

    def immutable(self, *a, **k):  # root ignores chmod; a read-only or immutable directory refuses all the same
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "touch", immutable)
    with pytest.raises(ConfigError, match="cannot write to the output directory") as info:
        _make_out_dir(tmp_path / "out")
    assert info.value.field == "out"


def test_a_relative_unix_bridge_is_written_as_an_absolute_path(tmp_path, monkeypatch):
    # a file's relative socket follows the file: recommended.toml and the live check's config, both in --out,
    # would name <out>/bridge.sock instead of the socket this run reached
    from edge_runtime.cloud import CloudSettings
    from edge_runtime.explore import _cloud_toml

    monkeypatch.chdir(tmp_path)
    text = _cloud_toml(CloudSettings(address="unix:bridge.sock", insecure=True), None)
    assert f'address = "unix:{tmp_path / "bridge.sock"}"' in text


def test_a_run_that_fails_at_the_bridge_leaves_no_empty_output_directory(tiny_bundle, tiny_suite, tmp_path):
    from edge_runtime.cloud import CloudSettings
    from edge_runtime.errors import CloudError
    from edge_runtime.explore import explore

    out, kept = tmp_path / "new" / "out", tmp_path / "kept"
    down = CloudSettings(address="127.0.0.1:1", insecure=True, token="t", timeout_s=2.0)
    with pytest.raises(CloudError):
        explore(edge=str(tiny_bundle), cloud="big", out=out, suite=str(tiny_suite), cloud_settings=down, root=tmp_path / "runs")
    assert not out.exists() and not out.parent.exists()  # nor the directory made to hold it
    kept.mkdir()  # a directory the user made is theirs: it stays
    with pytest.raises(CloudError):
        explore(edge=str(tiny_bundle), cloud="big", out=kept, suite=str(tiny_suite), cloud_settings=down, root=tmp_path / "runs")
    assert kept.is_dir()


def test_a_run_that_fails_after_fitting_leaves_the_earlier_runs_estimator_with_its_recommendations(
        tiny_bundles, tiny_suite, tmp_path, monkeypatch):
    # the estimator was written as soon as it was fitted: an interrupted rerun left the earlier recommended.toml
    # loading another run's estimator (and serve --check passed it), and a failed first run a lone estimator.json
    import edge_runtime.explore as explore_module

    edge, cloud = str(tiny_bundles("llama", "fp32")), str(tiny_bundles("qwen2", "fp32"))
    out = tmp_path / "out"
    explore_module.explore(edge=edge, cloud=cloud, out=out, suite=str(tiny_suite), goals=["max-accuracy usd<=1000/1k"],
                           root=tmp_path / "runs")
    before = (out / "estimator.json").stat()
    assert (out / "recommended.toml").exists()
    meta = json.loads((out / "estimator.json").read_text())["meta"]
    assert (meta["suite"], meta["split"]) == (str(tiny_suite), "dev")  # eval tells in-sample scoring by them

    def interrupted(_m):
        raise KeyboardInterrupt

    monkeypatch.setattr(explore_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        explore_module.explore(edge=edge, cloud=cloud, out=out, suite=str(tiny_suite), limit=3, root=tmp_path / "runs")
    after = (out / "estimator.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with pytest.raises(KeyboardInterrupt):
        explore_module.explore(edge=edge, cloud=cloud, out=tmp_path / "new" / "out", suite=str(tiny_suite), limit=3,
                               root=tmp_path / "runs")
    assert not (tmp_path / "new").exists()


def test_every_explored_policy_is_labelled_as_the_policy_describes_itself():
    # the early-exit rows read "early_exit(bar=0.2,k=2)": written into a config, that is the default signal
    # (mean_prob), not the min_prob the explorer measured, and another policy
    import types

    from edge_runtime.explore._space import policy_grid
    from edge_runtime.policies import policy_from_config

    m = types.SimpleNamespace(dev_p_correct=np.linspace(0.0, 1.0, 50),
                              records=types.SimpleNamespace(cloud_usd=np.full(3, 0.01)))
    grid = dict(policy_grid(m))
    assert grid.pop("always-local") == {"type": "never"} and grid.pop("always-cloud") == {"type": "always"}
    assert any(label.startswith("early_exit(min_prob<") for label in grid)
    for label, config in grid.items():
        if label.startswith("budget("):  # named by its share of this run's spend; the config holds the dollars
            continue
        assert policy_from_config(config).describe() == label
    # and one label, one policy: a label that left out a parameter (the early exit's signal, pre_route's
    # decide_local) named the default policy too
    described = {}
    for config in [*grid.values(), {"type": "pre_route", "bar": 0.3},
                   {"type": "early_exit", "bar": 0.2, "min_tokens": 4}]:
        policy = policy_from_config(config)
        assert described.setdefault(policy.describe(), policy.to_config()) == policy.to_config(), policy.describe()


def test_with_a_measured_meter_a_row_with_escalations_is_labelled_estimated(tmp_path):
    # the radio and waiting energy of an escalation come from the cost model and the device profile: always-cloud's
    # joules were all estimates, and its row read "rapl:package-0,false"; the plot's axis said "measured" alone
    import csv
    from types import SimpleNamespace

    from edge_runtime.explore._report import joules_label, write_csv

    def point(name, estimated_j):
        o = {"accuracy": 0.5, "escalation_rate": 1.0 if estimated_j else 0.0, "cloud_usd_per_1k": 0.0,
             "device_j_per_request": 2.5, "estimated_j_per_request": estimated_j, "latency_p50_ms": 1.0,
             "latency_p95_ms": 1.0, "early_exit_rate": 0.0, "pre_decode_escalation_rate": 0.0, "forced_local_rate": 0.0}
        return SimpleNamespace(name=name, family=name, overall=o, by_family={}, config={})

    write_csv(tmp_path / "p.csv", [point("always-local", 0.0), point("always-cloud", 2.5)], [],
              energy_source="rapl:package-0", energy_estimated=False)
    rows = {r["policy"]: r for r in csv.DictReader((tmp_path / "p.csv").read_text().splitlines())}
    assert rows["always-local"]["energy_estimated"] == "false" and rows["always-cloud"]["energy_estimated"] == "true"
    assert rows["always-cloud"]["estimated_j_per_request"] == "2.5"
    assert "network and wait energy ESTIMATED" in joules_label("rapl:package-0", False)


def test_a_family_name_stays_in_its_table_cell():
    # a "|" or a line break in a suite's family name split the report's table rows
    from edge_runtime.explore._report import _cell

    assert _cell("a|b\nc") == "a\\|b c" and _cell("orders") == "orders"


def test_the_live_check_reports_a_disagreement_whatever_the_count_and_claims_no_agreement_on_few_items():
    from edge_runtime.explore._validate import verdict

    assert verdict(False, (0.5, 0.5), 4) == "DO NOT agree within sampling error"  # 100% predicted, 0% measured
    assert verdict(True, (0.5, 0.1), 40) == "too few held-back items to tell"
    assert verdict(True, (0.0, 0.0), 4) == "too few held-back items to tell"  # every answer right: margin 0
    assert verdict(True, (0.2, 0.1), 40) == "agree within sampling error"
