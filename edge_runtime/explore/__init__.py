"""Design-space explorer: measure the accuracy / money / energy / latency trade-off and recommend a policy.

::

    edge-runtime explore --edge smollm2-135m-instruct --cloud qwen2.5-coder-0.5b-instruct \\
        --suite default --split test --out out/explore --goal "accuracy>=0.95*cloud"

Every item runs once on the edge and once through a real bridge over gRPC
(cached, so re-running with new policies or goals costs nothing and an
interrupted run resumes); every policy family × parameter grid is replayed
offline; the Pareto frontier and the per-family winners go into
``DIR/report.md``, ``DIR/points.csv``, ``DIR/frontier.csv`` and PNG plots; the
policy meeting the goal is written as a config snippet the daemon loads as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import secrets
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import write_text_whole
from .._child import child_service, free_port
from ..cache import cache_dir
from ..confidence import estimator_scores, load_estimator, make_dataset, save_estimator
from ..cloud import CloudSettings
from ..cost import CostSettings, idle_watts, table_prices
from ..config import check_threads
from ..errors import BundleError, ConfigError
from ..power import EnergyMeter, PowerSettings, default_meter
from ..runs import prompt_keys
from ._data import Measurements, cloud_generate, measure
from ._goals import config_snippet, parse_goal, recommend, toml_value
from ._report import GAIN_ROW, PLOT_FILES, estimator_table, family_winners, joules_label, write_csv, write_plots, write_report
from ._space import Point, evaluate, pareto_front
from ._validate import agreement, validate_live, verdict

__all__ = ["ExploreResult", "explore", "local_bridge", "Point", "parse_goal", "recommend", "pareto_front"]

log = logging.getLogger(__name__)


@dataclass
class ExploreResult:
    out: Path
    points: list[Point]
    front: list[Point]
    recommendations: list[dict[str, Any]]
    measurements: Measurements
    winners: list[dict[str, Any]]
    estimators: list[dict[str, Any]]
    validation: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)

    def point(self, name: str) -> Point:
        return next(p for p in self.points if p.name == name)


@contextlib.contextmanager
def local_bridge(bundle: Path, *, cost: CostSettings, alias: str = "cloud") -> Iterator[tuple[str, str]]:
    """A bridge on 127.0.0.1 (plaintext, loopback only) serving ``bundle``; yields (address, token)."""
    from cloud_bridge import create_server, hash_token, load_bridge_settings

    from ..bundle import load_manifest

    token = "ebt_" + secrets.token_urlsafe(24)
    # the price table's entry for this model by name (as price_usd reads it), else its "*" entry
    name = load_manifest(bundle).name
    if name not in cost.prices and "*" not in cost.prices:
        # table_prices' last resort is 0: every escalation was billed USD 0, unsaid, and the report's USD figures,
        # its budget policies and its goals on usd went with it
        raise ConfigError(f"no price for the cloud model {name!r} and no \"*\" entry (it names "
                          f"{', '.join(map(repr, cost.prices)) or 'no model'}): the explorer's bridge would bill "
                          f"every escalation USD 0; add {name!r} or \"*\" (\"*\" = {{input = 0, output = 0}} for a "
                          "free cloud)", field="cost.prices")
    price_in, price_out = table_prices(cost, name)
    settings = load_bridge_settings(data={
        "server": {"address": "127.0.0.1:0", "grace_period_s": 2.0},
        "auth": {"tokens_file": None, "tokens": {"explorer": hash_token(token)}},
        "quota": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
        "models": {alias: {"backend": "onnx", "bundle": str(bundle), "workers": 1, "queue_size": 8,
                           "usd_per_million_input_tokens": price_in, "usd_per_million_output_tokens": price_out}},
    }, env={})
    server, port = create_server(settings, insecure=True)
    server.start()
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        server.stop(2.0)


def _machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {psutil.cpu_count(logical=False)} cores / {psutil.cpu_count()} threads, {platform.system()} {platform.release()}"


@contextlib.contextmanager
def _daemon(config_text: str, workdir: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """``edge-runtime serve`` in a subprocess with ``config_text``; yields its base URL; stops it on exit."""
    import urllib.request

    port = free_port()
    config = workdir / "validate-daemon.toml"
    config.write_text(config_text + f"\n[server]\nport = {port}\ngrpc_socket = \"\"\n", encoding="utf-8")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    cmd = [sys.executable, "-m", "edge_runtime.cli", "serve", "--config", str(config)]
    # the check runs the recommended config and nothing else: the user's EDGE_RUNTIME_* settings variables would
    # override it (EDGE_RUNTIME_POLICY=never checked "never"; EDGE_RUNTIME_SERVER_PORT moved the daemon off the
    # port polled here; EDGE_RUNTIME_CLOUD_TOKEN beside the config's token file is refused). The cache stays.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_RUNTIME_") or k == "EDGE_RUNTIME_CACHE"}
    with child_service(cmd, workdir / "validate-daemon.log", healthy, name="the daemon", timeout_s=timeout_s, env=env):
        yield url


def _secret_file(stack: contextlib.ExitStack, secret: str) -> Path:
    """A 0600 file holding ``secret`` in a private temporary directory removed when ``stack`` closes
    (never in the output directory, which users may commit)."""
    import tempfile

    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-runtime-")))
    path = directory / "bridge-token"
    path.touch(mode=0o600)
    path.write_text(secret, encoding="utf-8")
    return path


def _cloud_identity(client: Any, alias: str) -> tuple[str, tuple[float, float] | None, dict[str, str] | None]:
    """Identity of the cloud side for the run cache, the bridge's prices now (USD per million input, output tokens),
    and the model and revision the bridge names (recorded with the estimator's cloud prior).

    The key is the model the bridge serves, plus the revision of its weights when the bridge knows
    it (an ONNX bundle's hash), so a rebuilt model is never answered from old runs. The prices are
    not in the key: cached answers are billed again at them (see ``measure``).
    """
    models = client.list_models()
    info = next((m for m in models if (m.alias == alias if alias else m.is_default)), None)
    model = info.model if info is not None else (alias or "default")
    # the whole bundle's hash where the bridge sends it (its weights with another chat template answer otherwise)
    revision = (info.bundle_revision or info.revision) if info is not None else ""
    if revision:
        model += "-" + revision[:16]
    prices = (info.usd_per_million_input_tokens, info.usd_per_million_output_tokens) if info is not None else None
    # the files' hash too: a device may escalate to an older bridge, which reports only that
    served = {"model": info.model, "revision": revision, "files_revision": info.revision} if info is not None else None
    return f"bridge-{alias or 'default'}-{model}", prices, served


def _make_out_dir(out: Path) -> Path | None:
    """The output directory, made and proved writable before the long run (its files are written at the end);
    the outermost directory made now (None: it existed)."""
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".edge-runtime-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:  # a file in the way, no permission, a read-only or immutable directory
        raise ConfigError(f"cannot write to the output directory {out}: {err.strerror or err}", field="out") from err
    return created


def _held_back(items: Sequence[Any], fraction: float) -> list[Any]:
    """The items the live check keeps back: ``fraction`` of them, stepped through the items grouped by family (each
    family gives its share, give or take one, and the remainders add up across families). Every k-th item of the
    list as given held back whole families when the items came in turns and their count shared a factor with k (a
    4-family suite with --limit: all held-back items were one family's, missing from the replay and its
    recommendation); and k = round(1 / fraction) made 0.4, 0.6 and 0.9 all 0.5."""
    by_family = sorted(range(len(items)), key=lambda i: items[i].family)  # stable: each family in its order
    held = {i for rank, i in enumerate(by_family)
            if int((rank + 1) * fraction + 1e-9) > int(rank * fraction + 1e-9)}  # the fraction's count steps up here
    return [item for i, item in enumerate(items) if i in held]


def _drop_if_unused(out: Path, created: Path, failed: bool) -> bool:
    """An exit callback: a run that failed before writing anything leaves none of the directories it made."""
    if failed:
        for directory in [out, *out.parents]:
            try:
                directory.rmdir()
            except OSError:  # not empty (another's files), or gone: leave it and what holds it
                break
            if directory == created:
                break
    return False  # the error goes on


def _check_bundle(path: Path, option: str) -> None:
    """A bundle directory's manifest, read before anything is written (a model directory is not a bundle)."""
    from ..bundle import load_manifest

    try:
        load_manifest(path)
    except BundleError as err:
        raise BundleError(f"{option}: {err}") from err


def _saved_cloud_toml(cloud: CloudSettings, local_bundle: Path | None, token_file: Path | None,
                      prices: tuple[float, float] | None = None) -> str:
    """The ``[cloud]`` part of recommended.toml: the bridge measured, or what to write when it is gone (with
    ``prices``, the bridge's USD per million input and output tokens the report billed at)."""
    if local_bundle is None:  # an external bridge: the same one, with the user's own token file
        # (the measuring runs' long timeout is not a serving setting: the default applies)
        text = "# the bridge the explorer measured (it must be running for escalations to reach it)\n"
        text += _cloud_toml(cloud, token_file, timeout=False)
        if token_file is None:
            text += '# token_file = "..."  # the device token for this bridge (`cloud-bridge token add DEVICE`)\n'
        return text
    # as written, it must work against such a bridge: a plaintext one on this machine (the template without
    # `insecure` failed every escalation on a TLS handshake), billing what the report billed (else $0)
    priced = (f", usd_per_million_input_tokens = {toml_value(prices[0])} and usd_per_million_output_tokens = "
              f"{toml_value(prices[1])}, the prices this report billed at" if prices is not None else "")
    return (
        "# The explorer measured the cloud on a loopback bridge of its own, gone now. Without a [cloud]\n"
        "# section every escalation is answered locally (route local_forced). Serve the same model with\n"
        "# `cloud-bridge serve --config bridge.toml --insecure` on this machine (bridge.toml with a [models.NAME]\n"
        f"# entry: backend = \"onnx\", bundle = {toml_value(str(local_bundle.resolve()))}{priced}) and uncomment:\n"
        "# [cloud]\n"
        '# address = "127.0.0.1:50051"\n'
        "# insecure = true  # plaintext, to a bridge on this machine only; a bridge elsewhere serves TLS: ca_file = \"...\"\n"
        '# token_file = "device.token"  # from `cloud-bridge token add DEVICE`\n'
    )


def _cloud_toml(cloud: CloudSettings, token_file: Path | None, *, timeout: bool = True) -> str:
    # values through toml_value: a Windows path's backslashes or a quote must not break the file
    address = cloud.address
    if address.startswith("unix:") and not address.startswith("unix://"):
        # a file's relative socket follows the file: the one this run reached is the working directory's
        address = f"unix:{Path(os.path.expanduser(address[len('unix:'):])).absolute()}"
    lines = ["[cloud]", f"address = {toml_value(address)}", f"insecure = {toml_value(cloud.insecure)}"]
    if timeout:
        lines.append(f"timeout_s = {toml_value(cloud.timeout_s)}")
    if cloud.model:
        lines.append(f"model = {toml_value(cloud.model)}")
    if token_file is not None:
        lines.append(f"token_file = {toml_value(str(token_file))}")
    for name in ("ca_file", "cert_file", "key_file"):
        value = getattr(cloud, name)
        if value is not None:
            lines.append(f"{name} = {toml_value(str(value))}")
    if cloud.server_name:
        lines.append(f"server_name = {toml_value(cloud.server_name)}")
    return "\n".join(lines) + "\n"


def explore(
    *,
    edge: str,
    cloud: str,
    out: str | os.PathLike[str],
    suite: str = "default",
    split: str = "test",
    limit: int | None = None,
    goals: Sequence[str] = ("accuracy>=0.95*cloud",),
    cloud_settings: CloudSettings | None = None,
    cost: CostSettings | None = None,
    requests_per_day: float = 1000.0,
    validate: bool = False,
    holdout: float = 0.25,
    threads: int | None = None,
    prompt_lookup: int = 0,
    power: PowerSettings | None = None,
    root: Path | None = None,
) -> ExploreResult:
    """Measure, replay, report, recommend.

    ``cloud`` is a bundle (the explorer serves it on a loopback bridge of its
    own) or, with ``cloud_settings`` naming an external bridge, a model alias
    there. ``validate`` holds back a share of the items and runs the
    recommended policy live through ``edge-runtime serve`` and the bridge.
    ``prompt_lookup``: the edge engine's drafts (``[engine] prompt_lookup``), also
    written into the recommended configs. ``power``: how the edge runs' energy is
    measured (``[power]``; default: the environment's), also written into them.
    """
    from ..cloud import CloudClient
    from ..engine import Engine
    from ..models import resolve_bundle
    from ..tasks import first_items, load_suite

    parsed = [parse_goal(g) for g in goals]  # goal errors before any work
    if not str(out).strip():  # Path("") is the working directory: an unset $OUT would overwrite the user's files
        raise ConfigError("is empty (name a directory for the report, CSVs and configs)", field="out")
    out = Path(out)
    if not 0.0 < holdout < 1.0:
        raise ConfigError("must be between 0 and 1", field="holdout")
    cost = cost or CostSettings()
    items = first_items(load_suite(suite, split), limit)
    dev_items = first_items(load_suite(suite, "dev"), limit)
    if not items or not dev_items:
        raise ConfigError(f"suite {suite!r} needs items in both the dev split (to fit the estimator) and the "
                          f"{split} split", field="split")
    # bundles are found before anything is written: a typo leaves no empty output directory behind
    edge_bundle = resolve_bundle(edge, field="--edge")
    _check_bundle(edge_bundle, "--edge")
    local_bundle = None
    if cloud_settings is None or not cloud_settings.address:
        try:
            local_bundle = resolve_bundle(cloud, field="--cloud")
        except BundleError as err:
            raise BundleError(f"{err} (with no --config or --bridge naming a bridge, --cloud is a bundle the "
                              "explorer serves itself, not a model alias)") from err
        _check_bundle(local_bundle, "--cloud")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
        raise ConfigError(f"must be a whole number >= 1, got {threads!r}", field="--threads")
    check_threads(threads, field="--threads")  # the engine's own bound, said as the flag (not intra_op_threads)
    created = _make_out_dir(out)
    held: list[Any] = []
    if validate:
        held = _held_back(items, holdout)
        held_ids = {it.id for it in held}
        items = [it for it in items if it.id not in held_ids]

    meter = EnergyMeter.from_settings(power) if power is not None else default_meter()
    with contextlib.ExitStack() as stack:
        if created:  # an unreachable bridge, a failed measurement: no empty directory left behind
            stack.push(lambda kind, _err, _tb: _drop_if_unused(out, created, kind is not None))
        if power is not None:  # a meter of its own (its sampler thread), closed whatever happens; not the shared one
            stack.callback(meter.close)
        engine = Engine(edge_bundle, intra_op_threads=threads, prompt_lookup=prompt_lookup, energy_meter=meter)
        stack.callback(engine.close)
        user_token_file = None
        if local_bundle is not None:
            address, token = stack.enter_context(local_bridge(local_bundle, cost=cost))
            cloud_settings = CloudSettings(address=address, token=token, insecure=True, timeout_s=300.0)
            bridge_label, alias = f"{address} (a loopback bridge started by the explorer)", ""
            token_file = _secret_file(stack, token)
        else:
            assert cloud_settings is not None  # no bridge named: local_bundle was resolved above
            bridge_label, alias = cloud_settings.address, cloud
            if alias and cloud_settings.model != alias:
                # the saved and the validating configs must escalate to the model measured, not the bridge's default
                cloud_settings = dataclasses.replace(cloud_settings, model=alias)
            token_file = user_token_file = cloud_settings.token_file
            if token_file is None and cloud_settings.token:
                token_file = _secret_file(stack, cloud_settings.token)
        client = stack.enter_context(CloudClient(cloud_settings))
        if alias:  # before any item is sent: an alias the bridge does not serve would fail every one of them
            served = [m.alias for m in client.list_models()]
            if alias not in served:
                raise ConfigError(f"the bridge at {cloud_settings.address} serves no model alias {alias!r} "
                                  f"(it serves: {', '.join(served)})", field="cloud")
        if split in ("dev", "all"):
            what = "measuring on it too" if split == "dev" else "the dev items of --split all"
            log.warning("the estimator is fitted on the dev split: %s is in-sample, "
                        "so its routing figures will look better than they are (use --split test)", what)
        cloud_key, cloud_prices, cloud_model = _cloud_identity(client, alias)
        if local_bundle is not None:  # its own loopback bridge runs this onnxruntime: keyed by it, as edge runs are
            cloud_key += f"-ort{engine.onnxruntime_version}"
        m = measure(engine, cloud_generate(client, alias), cloud_key, items, dev_items, cost=cost,
                    root=root, cloud_prices=cloud_prices, model_hint=alias or "*", cloud_model=cloud_model)
        if isinstance(m.estimator.meta, dict):  # what it was fitted on: eval warns when it scores the same items
            m.estimator.meta.update({"suite": suite, "split": "dev", "fitted_prompts": prompt_keys(dev_items)})

        points = evaluate(m)
        front = pareto_front(points)
        families = sorted(set(m.families.tolist()))
        data = make_dataset(m.edge, m.items)
        scores = {
            "multi+knn (fitted on dev)": m.p_correct,
            "kNN pre-route (prompt only)": m.pre_route_p,
            # the score is p_correct - p_cloud: the lowest (the largest expected gain) escalates first
            GAIN_ROW: m.p_correct - m.p_cloud,
            "generic (built-in default)": estimator_scores(load_estimator(None), data),
            "min token logprob (raw)": data.matrix(["lp_min"])[:, 0],
        }
        estimators = estimator_table(m, scores)
        winners = family_winners(points, families)
        by = {p.name: p for p in points}
        baselines = {"cloud": by["always-cloud"].overall["accuracy"], "local": by["always-local"].overall["accuracy"]}
        saved_cloud = _saved_cloud_toml(cloud_settings, local_bundle, user_token_file, cloud_prices)
        recommendations = []
        files = ["report.md", "points.csv", "frontier.csv", "estimator.json"]
        live_configs: list[tuple[dict[str, Any], str]] = []  # (recommendation, config for the live check)
        # an earlier run's outputs must not outlive it (its recommendations, its plots when this run draws none, its
        # live check's config and log, and its report and tables, which a run that fails partway would leave beside
        # this run's recommendations); a user's own recommended-prod.toml stays
        for stale in [*out.glob("recommended.toml"), *(f for f in out.glob("recommended-*.toml") if f.stem[12:].isdigit()),
                      *(out / name for name in (*PLOT_FILES, "report.md", "points.csv", "frontier.csv")),
                      out / "validate-daemon.toml", out / "validate-daemon.log"]:
            stale.unlink(missing_ok=True)
        # only now, with the earlier run's recommendations gone: written when it was fitted, a run that then failed
        # (interrupted, the cloud's answers refused) left the earlier recommended.toml loading this estimator, and a
        # failed first run a directory holding only it
        save_estimator(m.estimator, out / "estimator.json")
        for i, goal in enumerate(parsed):
            point = recommend(goal, points, baselines)
            rec: dict[str, Any] = {"goal": goal.text, "point": point, "config_file": None,
                                   "constraints": [c.describe(baselines) for c in goal.constraints]}
            if point is not None:
                name = "recommended.toml" if i == 0 else f"recommended-{i + 1}.toml"
                fields = {"estimator_path": str((out / "estimator.json").resolve()), "n_items": len(m.items),
                          "requests_per_day": requests_per_day, "goal": goal.text,
                          # absolute, as the estimator's path: the config must load from any directory
                          "bundle": str(edge_bundle.resolve()), "cost": cost, "prompt_lookup": prompt_lookup,
                          "power": power}
                write_text_whole(out / name, config_snippet(point, **fields, cloud=saved_cloud))
                # the live check runs it against the bridge measured here (its token in a private file)
                live_configs.append((rec, config_snippet(point, **fields, cloud=_cloud_toml(cloud_settings, token_file))))
                rec["config_file"] = name
                files.append(name)
            recommendations.append(rec)

        def write_outputs(validation: dict[str, Any] | None) -> list[str]:
            """The tables, plots and report (with the live check's result when there is one); the plots' names."""
            energy_source = ", ".join(sorted({str(e.get("energy_source")) for e in m.edge}))
            energy_estimated = any(e.get("energy_estimated") for e in m.edge)
            write_csv(out / "points.csv", points, families, energy_source=energy_source, energy_estimated=energy_estimated)
            write_csv(out / "frontier.csv", front, families, energy_source=energy_source, energy_estimated=energy_estimated)
            plots = write_plots(out, m, points, front, joules=joules_label(energy_source, energy_estimated))
            context = {
                # which weights and manifest answered, as the run cache keys them: a figure can be traced to its bundle (QA QQ)
                "edge": engine.model_name, "edge_hash": engine.bundle_hash,
                "cloud": cloud, "cloud_revision": (cloud_model or {}).get("revision") or "", "bridge": bridge_label, "suite": suite, "split": split, "machine": _machine(),
                "energy_source": energy_source,
                "energy_estimated": energy_estimated,
                "command": "edge-runtime " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                "cost_note": f"cloud USD from the bridge's price table; device energy priced at {cost.electricity_usd_per_kwh} USD/kWh; "
                             f"escalation radio energy for {cost.network} ({cost.j_per_kb} J/KB + {cost.j_per_request} J per request) "
                             f"plus the device's idle draw while it waits for the cloud ({idle_watts(getattr(engine, 'energy_meter', None)):g} W, its profile's, "
                             "× the wait; an estimate)",
                "cache": str(root or cache_dir("runs", create=False)),
                "validation": validation,
            }
            write_report(out / "report.md", m=m, points=points, front=front, families=families, estimators=estimators, winners=winners,
                         recommendations=recommendations, plots=plots, context=context)
            return plots

        validation = None
        if validate and not live_configs:
            log.warning("no goal is met: there is no recommended policy to check live")
        elif validate and not held:
            log.warning("too few items to hold any back for the live check (--limit %s): skipped", limit)
        elif validate:
            checked, config = live_configs[0]  # the first goal that has a recommendation
            try:
                with _daemon(config, out) as url:
                    live = validate_live(url, held)
            except BaseException as err:
                # the replay's report and tables stay beside its recommendations (only recommended.toml was left),
                # and the report says the check did not happen
                why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {err}"
                write_outputs({"summary": f"**The live check failed** ({why}): the recommendation above was not "
                                          "checked live."})
                raise
            pred = checked["point"].overall
            acc_ok, acc_margin = agreement(pred["accuracy"], live["accuracy"], live["n"], len(items))
            esc_ok, esc_margin = agreement(pred["escalation_rate"], live["escalation_rate"], live["n"], len(items))
            said = verdict(acc_ok and esc_ok, (acc_margin, esc_margin), live["n"])
            validation = {**live, "predicted_accuracy": pred["accuracy"], "predicted_escalation_rate": pred["escalation_rate"],
                          "accuracy_ok": acc_ok, "escalation_ok": esc_ok, "accuracy_margin": acc_margin,
                          "escalation_margin": esc_margin, "verdict": said,
                          "summary": (f"Live run of **{checked['point'].name}** (goal `{checked['goal']}`) through `edge-runtime serve` and the bridge on "
                                      f"{live['n']} held-back items: accuracy {live['accuracy']:.1%} (predicted {pred['accuracy']:.1%}, "
                                      f"±{acc_margin:.1%}), escalation {live['escalation_rate']:.1%} (predicted "
                                      f"{pred['escalation_rate']:.1%}, ±{esc_margin:.1%}): {said}. Routes: {live['routes']}.")}

    files += write_outputs(validation)
    return ExploreResult(out=out, points=points, front=front, recommendations=recommendations, measurements=m, winners=winners,
                         estimators=estimators, validation=validation, files=files)
