"""The daemon's settings layers as an operator meets them: file-relative bundles, thread bounds, a BOM, variables
without their section, --help naming each variable and default, and files checked before the daemon binds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import edge_runtime.daemon as daemon_pkg
from cloud_bridge import load_bridge_settings
from cloud_bridge.cli import main as bridge_main
from edge_runtime.cli import main
from edge_runtime.errors import BundleError, ConfigError
from edge_runtime.settings import load_runtime_settings


def _bundle(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "manifest.json").write_text("{}")
    return where


@pytest.mark.parametrize("written", ["./mine", "../conf/mine", "mine/"])
def test_a_bundle_written_as_a_path_follows_the_config_file_not_the_working_directory(tmp_path, monkeypatch, written):
    from edge_runtime.models import resolve_bundle

    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    conf, cwd = tmp_path / "conf", tmp_path / "cwd"
    conf.mkdir()
    _bundle(cwd / "mine")  # only in the working directory: it was loaded from there, and failed under systemd
    monkeypatch.chdir(cwd)
    (conf / "edge.toml").write_text(f'[engine]\nbundle = "{written}"\n')
    bundle = load_runtime_settings(conf / "edge.toml", env={}).engine.bundle
    assert Path(bundle).is_absolute() and Path(bundle).resolve() == (conf / "mine").resolve()
    with pytest.raises(BundleError) as info:  # the error names the absolute path it tried
        resolve_bundle(bundle, field="engine.bundle")
    assert f"bundle not found: {conf}" in str(info.value)
    _bundle(conf / "mine")
    assert resolve_bundle(bundle).resolve() == (conf / "mine").resolve()


def test_a_bare_bundle_name_keeps_naming_a_model_unless_a_bundle_of_that_name_is_beside_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    monkeypatch.chdir(tmp_path)
    (conf / "edge.toml").write_text('[engine]\nbundle = "smollm2-135m-instruct"\n')
    assert load_runtime_settings(conf / "edge.toml", env={}).engine.bundle == "smollm2-135m-instruct"
    _bundle(conf / "smollm2-135m-instruct")
    assert load_runtime_settings(conf / "edge.toml", env={}).engine.bundle == str(conf / "smollm2-135m-instruct")
    # in the environment and in flags a path stays the working directory's
    env = {"EDGE_RUNTIME_ENGINE_BUNDLE": "./mine"}
    assert load_runtime_settings(conf / "edge.toml", env=env).engine.bundle == "./mine"


def test_a_budgets_state_file_follows_the_config_file(tmp_path, monkeypatch):
    conf, cwd = tmp_path / "conf", tmp_path / "cwd"
    conf.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (conf / "edge.toml").write_text('[policy]\nchain = [{type = "budget", usd_per_day = 1.0, state_file = "spend.json"},'
                                    ' {type = "always"}]\n')
    policy = load_runtime_settings(conf / "edge.toml", env={}).policy
    assert policy["chain"][0]["state_file"] == str(conf / "spend.json")
    # the chain's other spelling too: it stayed the working directory's ("cannot write in '/'" under systemd)
    (conf / "edge.toml").write_text('[policy]\ntype = "chain"\npolicies = [{type = "budget", usd_per_day = 1.0, '
                                    'state_file = "spend.json"}, {type = "always"}]\n')
    policy = load_runtime_settings(conf / "edge.toml", env={}).policy
    assert policy["policies"][0]["state_file"] == str(conf / "spend.json")


@pytest.mark.parametrize("threads", [0, -1, 1025, 2**31, 10**20])
def test_engine_threads_out_of_range_is_refused_with_the_settings(threads):
    # 2**31 was a TypeError traceback from onnxruntime once the daemon was listening, naming no setting
    for source in ({"data": {"engine": {"threads": threads}}, "env": {}},
                   {"data": {}, "env": {"EDGE_RUNTIME_ENGINE_THREADS": str(threads)}}):
        with pytest.raises(ConfigError, match="must be from 1 to 1024") as info:
            load_runtime_settings(**source)
        assert info.value.field == "engine.threads"
    assert load_runtime_settings(data={"engine": {"threads": 1024}}, env={}).engine.threads == 1024


def test_a_config_file_saved_with_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nport = 0\n")  # "UTF-8 with BOM", as Windows editors save it
    assert load_runtime_settings(path, env={}).server.port == 0
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xef\xbb\xbf[server]\nhost = \"caf\xe9\"\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 23\)"):  # counted in the file, BOM included
        load_runtime_settings(bad, env={})



def test_settings_nested_too_deeply_are_a_config_error_not_a_traceback(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.toml"
    path.write_text(f"x = {deep}\n")
    with pytest.raises(ConfigError, match="not valid TOML: nested too deeply"):
        load_runtime_settings(path, env={})
    with pytest.raises(ConfigError, match="nested too deeply") as info:
        load_runtime_settings(env={"EDGE_RUNTIME_ENGINE_PROVIDERS": deep})
    assert info.value.field == "engine.providers"

@pytest.mark.parametrize("load, env, warned", [
    (load_runtime_settings,
     {"EDGE_RUNTIME_PORT": "38031", "EDGE_RUNTIME_QUEUE_SIZE": "3", "EDGE_RUNTIME_TOKEN": "secret-value",
      "EDGE_RUNTIME_CACHE": "/tmp/x"},  # the cache's own variable is not a setting: never warned about
     ["EDGE_RUNTIME_PORT is not a setting and is ignored (did you mean EDGE_RUNTIME_SERVER_PORT?)",
      "EDGE_RUNTIME_QUEUE_SIZE is not a setting and is ignored (did you mean EDGE_RUNTIME_SERVER_QUEUE_SIZE?)",
      "EDGE_RUNTIME_TOKEN is not a setting and is ignored (did you mean EDGE_RUNTIME_CLOUD_TOKEN?)"]),
    (load_bridge_settings,
     {"CLOUD_BRIDGE_ADDRESS": "127.0.0.1:38032", "CLOUD_BRIDGE_REQUESTS_PER_MINUTE": "1"},
     ["CLOUD_BRIDGE_ADDRESS is not a setting and is ignored (did you mean CLOUD_BRIDGE_SERVER_ADDRESS?)",
      "CLOUD_BRIDGE_REQUESTS_PER_MINUTE is not a setting and is ignored "
      "(did you mean CLOUD_BRIDGE_QUOTA_REQUESTS_PER_MINUTE?)"]),
], ids=["daemon", "bridge"])
def test_a_variable_without_its_section_is_warned_about_naming_the_right_one(caplog, load, env, warned):
    # the most natural slip (a misspelt section was warned about, a misspelt field refused) was ignored silently
    with caplog.at_level(logging.WARNING):
        load(data={}, env=env)
    assert sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING") == warned
    assert "secret-value" not in caplog.text


@pytest.mark.parametrize("cli, shown, secret", [
    (main, ["HTTP port (0: any free port) [env EDGE_RUNTIME_SERVER_PORT; default 8080]",
            "[env EDGE_RUNTIME_SERVER_QUEUE_SIZE; default 16]", "[env EDGE_RUNTIME_CLOUD_TIMEOUT_S; default 30]",
            "[env EDGE_RUNTIME_SERVER_REQUEST_TIMEOUT_S; default 300]",
            "[env EDGE_RUNTIME_SERVER_LOG_CONTENT; default false]", "[env EDGE_RUNTIME_ENGINE_THREADS; default unset]",
            '[env EDGE_RUNTIME_POLICY; default {"type": "threshold", "p": 0.5}]', "SIGHUP"],
     "EDGE_RUNTIME_CLOUD_TOKEN;"),
    (bridge_main, ["[env CLOUD_BRIDGE_SERVER_ADDRESS; default 127.0.0.1:50051]",
                   "[env CLOUD_BRIDGE_QUOTA_REQUESTS_PER_MINUTE; default 60]",
                   "[env CLOUD_BRIDGE_QUOTA_TOKENS_PER_MINUTE; default 100000]",
                   "[env CLOUD_BRIDGE_AUTH_TOKENS_FILE; default bridge-tokens.toml]", "CLOUD_BRIDGE_* variable",
                   "[models.<alias>] are set in the file or all at once by CLOUD_BRIDGE_MODELS"],
     "CLOUD_BRIDGE_AUTH_TOKENS;"),  # the inline hashes
], ids=["daemon", "bridge"])
def test_serve_help_names_each_settings_variable_and_default(capsys, monkeypatch, cli, shown, secret):
    # an operator writing an EnvironmentFile had to derive the names by hand, and most defaults were not shown
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapped (argparse breaks at hyphens too)
    with pytest.raises(SystemExit):
        cli(["serve", "--help"])
    out = capsys.readouterr().out
    for text in shown:
        assert text in out, text
    assert secret not in out  # a secret has no flag, and so no default shown


class _Bound(Exception):
    """Raised where the daemon would bind: the settings got past every check before it."""


@pytest.fixture
def reaching_the_bind(monkeypatch):
    def bind(*_args, **_kwargs):
        raise _Bound

    monkeypatch.setattr(daemon_pkg, "create_server", bind)


@pytest.mark.parametrize("flags, field", [
    (["--cloud-address", "127.0.0.1:50999", "--cloud-ca-file", "nope.pem"], "cloud.ca_file: cannot read"),
    (["--cloud-address", "10.255.255.1:50051", "--cloud-insecure"], "cloud.insecure: plaintext is only allowed"),
    (["--engine-estimator", "nope.json"], "engine.estimator: estimator file not found"),
    # a relative bundle path from an older config: it failed after "listening on", a restart loop under systemd
    (["--engine-bundle", "bundles/nope"], "engine.bundle: bundle not found"),
    # the energy meter was made as the model loaded: "listening on", then "cannot load the model"
    (["--power-source", "rapl", "--power-sysfs-root", "."], "power.source: power source 'rapl' is not present"),
    (["--power-sysfs-root", "nope"], "power.sysfs_root: nope is not a directory"),
    (["--power-sysfs-root", ""], "power.sysfs_root: must name a path"),
])
def test_serve_refuses_a_missing_file_or_plaintext_off_loopback_before_binding(
        reaching_the_bind, tmp_path, monkeypatch, capsys, flags, field):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--server-port", "0", "--server-grpc-socket", "", *flags]) == 1
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err, err


def test_serve_with_good_cloud_settings_goes_on_to_bind(reaching_the_bind, capsys, tiny_bundle):
    with pytest.raises(_Bound):  # the checks themselves refuse nothing that is right
        main(["serve", "--server-port", "0", "--server-grpc-socket", "", "--cloud-address", "127.0.0.1:1",
              "--cloud-insecure", "--engine-bundle", str(tiny_bundle)])


def test_power_help_names_the_variables_the_power_settings_read(capsys, monkeypatch):
    # it named EDGE_RUNTIME_PROFILE and the like, which nothing reads: a Pi user exporting one got the generic profile
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main(["power", "--help"])
    out = capsys.readouterr().out
    assert "[env EDGE_RUNTIME_POWER_PROFILE; default generic]" in out and "EDGE_RUNTIME_PROFILE" not in out


def test_serve_check_refuses_two_budgets_on_one_state_file(capsys, tmp_path, tiny_bundle):
    # it passed them, and `serve` then failed at every start after it was listening
    state = tmp_path / "spend.json"
    policy = (f'{{chain = [{{type = "budget", usd = 1, state_file = "{state}"}}, '
              f'{{type = "budget", usd = 2, state_file = "{state}"}}, {{type = "always"}}]}}')
    assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), "--policy", policy]) == 1
    assert "policy.chain[1].state_file:" in capsys.readouterr().err


def test_serve_check_refuses_an_execution_provider_this_onnxruntime_lacks(capsys, tmp_path, tiny_bundle):
    # it passed them, and `serve` then failed after it was listening
    config = tmp_path / "prov.toml"
    config.write_text('[engine]\nproviders = ["XnnpackNopeExecutionProvider", "CPUExecutionProvider"]\n'
                      '[engine.provider_options.XnnpackNopeExecutionProvider]\nintra_op_num_threads = 2\n')
    assert main(["serve", "--check", "--config", str(config), "--engine-bundle", str(tiny_bundle)]) == 1
    captured = capsys.readouterr()
    assert "engine.providers: execution provider(s) XnnpackNopeExecutionProvider not available" in captured.err
    assert "configuration is valid" not in captured.out


def test_serve_check_refuses_a_power_source_this_device_lacks(capsys, tmp_path, tiny_bundle):
    # it passed them, and `serve` then failed after it was listening
    import threading

    tree = tmp_path / "tree"
    tree.mkdir()
    for flags, field in ((["--power-source", "rapl", "--power-sysfs-root", str(tree)], "power.source:"),
                         (["--power-sysfs-root", str(tmp_path / "typo")], "power.sysfs_root:")):
        assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), *flags]) == 1, flags
        captured = capsys.readouterr()
        assert field in captured.err and "configuration is valid" not in captured.out, (flags, captured)
    zone = tree / "sys/class/powercap/intel-rapl:0"  # the same source, present: valid
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("1000000\n")
    assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), "--power-source", "rapl",
                 "--power-sysfs-root", str(tree)]) == 0
    assert "configuration is valid" in capsys.readouterr().out
    assert not [t for t in threading.enumerate() if t.name.startswith("edge-runtime-power-sampler")]


def test_serve_check_warns_as_the_daemon_does_when_the_bridge_has_no_device_token(capsys, caplog, tmp_path, tiny_bundle):
    # it said "valid" alone, while the bridge would refuse every escalation (an empty token file, say)
    empty = tmp_path / "token"
    empty.write_text("\n")
    empty.chmod(0o600)
    bridge = ["--cloud-address", "127.0.0.1:50051", "--cloud-insecure"]
    for flags, said in (([], "no device token is configured"), (["--cloud-token-file", str(empty)], f"the token file {empty} is empty")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), *bridge, *flags]) == 0
        assert "configuration is valid" in capsys.readouterr().out
        assert f"cloud.token_file: {said}" in caplog.text, flags
    token = tmp_path / "good"
    token.write_text("ebt_x\n")
    token.chmod(0o600)
    caplog.clear()
    assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), *bridge, "--cloud-token-file", str(token)]) == 0
    assert "cloud.token_file" not in caplog.text
