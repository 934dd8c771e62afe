"""The daemon's parts on their own: admission, metrics text, request parsing, error mapping, CLI, exports."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import edge_runtime.daemon as daemon_pkg
from edge_runtime.cli import main
from edge_runtime.daemon import Admission, ApiError, Metrics, api_error, parse_chat_request
from edge_runtime.daemon._metrics import Histogram
from edge_runtime.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    OutOfMemoryError,
    QueueFullError,
    RequestTimeoutError,
    ServiceUnavailableError,
)

from .conftest import ASK, metric


def test_exported_names_exist():
    for name in daemon_pkg.__all__:
        assert getattr(daemon_pkg, name) is not None, name


def test_admission_runs_slots_queues_the_rest_in_order_and_refuses_beyond():
    a = Admission(slots=1, queue_size=2)
    first = a.enter()
    assert first.granted and a.running == 1
    second, third = a.enter(), a.enter()
    assert not second.granted and a.waiting == 2
    with pytest.raises(QueueFullError) as info:
        a.enter()
    assert info.value.retry_after_s >= 1
    order: list[str] = []

    def wait(ticket, name):
        assert ticket.wait(lambda: False)
        order.append(name)
        time.sleep(0.02)
        ticket.release()

    threads = [threading.Thread(target=wait, args=(t, n)) for t, n in ((third, "third"), (second, "second"))]
    for t in threads:
        t.start()
    time.sleep(0.05)
    assert order == []  # nobody runs while the slot is held
    first.release()
    for t in threads:
        t.join(5)
    assert order == ["second", "third"]  # first come, first served
    assert a.admitted == 0 and a.wait_idle(0.1)


def test_a_waiter_that_is_cancelled_leaves_the_queue_without_running():
    a = Admission(slots=1, queue_size=1)
    holder = a.enter()
    waiter = a.enter()
    assert waiter.wait(lambda: True) is False
    waiter.release()
    assert a.waiting == 0 and a.running == 1
    holder.release()
    assert a.admitted == 0


def test_metrics_text_is_prometheus_and_histograms_are_cumulative():
    h = Histogram([0.1, 1.0])
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    lines = h.lines("x_seconds", (("route", "local"),))
    assert lines[:3] == ['x_seconds_bucket{route="local",le="0.1"} 1', 'x_seconds_bucket{route="local",le="1"} 3',
                         'x_seconds_bucket{route="local",le="+Inf"} 4']
    assert lines[-1] == 'x_seconds_count{route="local"} 4'
    m = Metrics(gauges=lambda: {"edge_runtime_queue_depth": 3})
    m.count_request("http", "rejected")
    text = m.render()
    assert metric(text, "edge_runtime_requests_total", outcome="rejected") == 1
    assert metric(text, "edge_runtime_queue_depth") == 3
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            _series, value = line.rsplit(" ", 1)
            float(value.replace("+Inf", "inf"))
    assert "# TYPE edge_runtime_request_duration_seconds histogram" in text
    with pytest.raises(ValueError):
        m.count_request("http", "lost")


def test_energy_series_say_where_the_joules_come_from_and_never_vanish():
    # an estimate was shown as a plain figure, and the local route's series vanished once another route answered
    from edge_runtime.daemon._metrics import ROUTES

    m = Metrics()
    assert "# TYPE edge_runtime_energy_source_info" not in m.render()  # not loaded yet: nothing to say
    m.energy_source = ("estimate:generic", True)
    text = m.render()
    assert metric(text, "edge_runtime_energy_source_info", source="estimate:generic", estimated="true") == 1
    for route in ROUTES:
        assert f'edge_runtime_energy_joules_total{{route="{route}"}} 0' in text


def test_openai_fields_map_to_sampling_params():
    req = parse_chat_request({"model": "local", "messages": ASK, "max_tokens": 7, "max_completion_tokens": 9,
                              "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": "\n", "logprobs": True,
                              "top_logprobs": 4, "stream": True, "stream_options": {"include_usage": True},
                              "n": 1, "user": "u1"})
    assert req.model == "local" and req.stream and req.include_usage and req.logprobs and req.top_logprobs == 4
    assert dict(req.sampling) == {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ("\n",),
                                  "top_logprobs": 4}
    assert req.param_name("max_new_tokens") == "max_completion_tokens"
    assert parse_chat_request({"messages": ASK}).model == "auto"
    # OpenAI takes any int64 seed: a negative one is taken modulo 2**63 (it was refused with a 400)
    assert parse_chat_request({"messages": ASK, "seed": -1}).sampling["seed"] == 2 ** 63 - 1
    assert parse_chat_request({"messages": ASK, "seed": -2 ** 63}).sampling["seed"] == 0


@pytest.mark.parametrize(("err", "status", "code"), [
    (ModelNotFoundError("x", field="model"), 404, "model_not_found"),
    (ContextLengthError("x", field="messages"), 400, "context_length_exceeded"),
    (InvalidRequestError("x", field="top_p"), 400, "invalid_value"),
    (QueueFullError("x", retry_after_s=2.2), 429, "queue_full"),
    (ServiceUnavailableError("x", reason="shutting_down"), 503, "shutting_down"),
    (RequestTimeoutError("x"), 504, "request_timeout"),
    (OutOfMemoryError("not enough memory to run this request"), 503, "out_of_memory"),
    (KeyError("secret internals"), 500, "internal_error"),
])
def test_errors_map_by_type(err, status, code):
    e = api_error(err)
    assert isinstance(e, ApiError) and (e.status, e.code) == (status, code)
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}
    if status == 429:
        assert e.all_headers()["Retry-After"] == "3"  # whole seconds, rounded up
    if status == 500:
        assert "secret" not in e.message


def test_serve_help_lists_the_settings_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--server-port", "--server-grpc-socket", "--server-allow-remote", "--engine-bundle",
                 "--cloud-address", "--server-queue-size", "--policy"):
        assert flag in out


def test_a_secret_setting_has_no_flag_no_repr_and_is_not_echoed(capsys):
    from edge_runtime.errors import ConfigError
    from edge_runtime.settings import load_runtime_settings

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--cloud-token-file" in capsys.readouterr().out
    from edge_runtime.cli import build_parser

    with pytest.raises(SystemExit) as info:  # a command line is visible to every user (ps)
        build_parser().parse_args(["serve", "--cloud-token", "ebt_secret"])  # parses only: never serves
    assert info.value.code == 2  # and not read as --cloud-token-file, a prefix match argparse would allow
    assert "unrecognized arguments: --cloud-token" in capsys.readouterr().err
    settings = load_runtime_settings(data={"cloud": {"token": "ebt_secret"}}, env={})
    assert settings.cloud.token == "ebt_secret"
    assert "ebt_secret" not in repr(settings) and "ebt_secret" not in repr(settings.cloud)
    with pytest.raises(ConfigError) as info:  # a token written as an array by mistake
        load_runtime_settings(data={"cloud": {"token": ["ebt_secret"]}}, env={})
    assert info.value.field == "cloud.token" and "ebt_secret" not in str(info.value)


def test_a_sigterm_while_serve_starts_is_a_clean_stop(monkeypatch):
    # before the daemon installs its draining handler (reading settings, binding), nothing has been taken: 0, as after
    # a drain; 143 would leave a systemd unit restarted in its first second "failed"
    import signal

    import edge_runtime.cli.serve as serve_cli

    def starting(_args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the start")

    monkeypatch.setattr(serve_cli, "_run", starting)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        main(["serve"])
    assert stopped.value.code == 0
    assert signal.getsignal(signal.SIGTERM) is before  # main put the previous handler back
    with pytest.raises(SystemExit) as stopped:  # an interrupted `serve --check` is no pass
        main(["serve", "--check"])
    assert stopped.value.code == 143
    import edge_runtime.cli.power as power_cli

    monkeypatch.setattr(power_cli, "_run", starting)
    with pytest.raises(SystemExit) as stopped:  # `power --watch` runs until stopped: SIGTERM is 0, as Ctrl-C is
        main(["power", "--watch"])
    assert stopped.value.code == 0
    monkeypatch.undo()
    import edge_runtime.cli.generate as generate_cli

    monkeypatch.setattr(generate_cli, "_run", starting)
    with pytest.raises(SystemExit) as stopped:  # any other command: 128 + SIGTERM, as before
        main(["generate", "x", "--prompt", "y"])
    assert stopped.value.code == 143


def test_serve_refuses_a_remote_bind_with_one_clear_line(capsys, tiny_bundle):
    assert main(["serve", "--server-host", "0.0.0.0", "--server-port", "0", "--server-grpc-socket", "",
                 "--engine-bundle", str(tiny_bundle)]) == 1
    err = capsys.readouterr().err
    assert "server.host" in err and "allow_remote" in err and "Traceback" not in err


def test_serve_check_validates_a_config_without_binding_or_loading(capsys, tmp_path, tiny_bundle, monkeypatch):
    # before a HUP applies an edit: a bad one would stop the daemon (and a few in a row hit systemd's start limit)
    import edge_runtime.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "create_server", lambda *_a, **_k: pytest.fail("--check bound a server"))
    assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), "--server-port", "8080"]) == 0
    out = capsys.readouterr().out
    assert "the configuration is valid" in out and "http://127.0.0.1:8080" in out and "no cloud" in out
    # QA: an IPv6 host was printed as http://::1:8080, not a URL
    assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), "--server-host", "::1",
                 "--server-port", "8080"]) == 0
    assert "http://[::1]:8080" in capsys.readouterr().out
    assert main(["serve", "--check", "--engine-bundle", str(tmp_path / "none")]) == 1
    assert "engine.bundle: bundle not found" in capsys.readouterr().err
    # what only the daemon's start checked before: it refused them after the check had passed them
    estimator = tmp_path / "other.json"
    estimator.write_text(json.dumps({"schema_version": 1, "kind": "heuristic", "bundle_hash": "0" * 64}))
    for flags, field in ((["--server-host", "0.0.0.0"], "server.host"),
                         (["--server-grpc-socket", str(tmp_path / ("s" * 120) / "x.sock")], "server.grpc_socket"),
                         (["--engine-estimator", str(estimator)], "engine.estimator"),
                         (["--policy", '{type = "pre_route", bar = 0.5}'], "policy.type")):
        assert main(["serve", "--check", "--engine-bundle", str(tiny_bundle), *flags]) == 1, flags
        captured = capsys.readouterr()
        assert f"{field}:" in captured.err and "configuration is valid" not in captured.out, (flags, captured)
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_bundle, broken)
    (broken / "tokenizer.json").write_text("{}")  # a file changed since the bundle was built
    assert main(["serve", "--check", "--engine-bundle", str(broken)]) == 1
    assert "engine.bundle:" in capsys.readouterr().err


def test_serve_reports_a_bad_setting_by_name(capsys, tmp_path, tiny_bundle):
    assert main(["serve", "--server-queue-size", "0"]) == 1
    assert "server.queue_size" in capsys.readouterr().err
    # an unreadable token file too, before the daemon says it is serving
    missing = tmp_path / "no-token"
    assert main(["serve", "--server-port", "0", "--server-grpc-socket", "", "--cloud-address", "127.0.0.1:1",
                 "--cloud-insecure", "--cloud-token-file", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "cloud.token_file: cannot read" in err and "listening on" not in err
    # a socket whose directory cannot be made: the OS error alone named no setting
    (tmp_path / "file").write_text("")
    assert main(["serve", "--server-port", "0", "--server-grpc-socket", str(tmp_path / "file" / "sub" / "x.sock"),
                 "--engine-bundle", str(tiny_bundle)]) == 1
    err = capsys.readouterr().err
    assert "server.grpc_socket" in err and "Traceback" not in err


def test_a_misspelt_environment_variable_is_an_error_naming_it(capsys, monkeypatch):
    from cloud_bridge import load_bridge_settings
    from edge_runtime.errors import ConfigError
    from edge_runtime.power import PowerSettings
    from edge_runtime.config import load_settings
    from edge_runtime.settings import load_runtime_settings

    monkeypatch.setenv("EDGE_RUNTIME_SERVER_PROT", "9000")  # PORT
    assert main(["serve", "--server-port", "0", "--server-grpc-socket", ""]) == 1
    err = capsys.readouterr().err
    assert "EDGE_RUNTIME_SERVER_PROT" in err and "EDGE_RUNTIME_SERVER_PORT" in err and "Traceback" not in err
    env = {"EDGE_RUNTIME_CACHE": "/tmp/x", "EDGE_RUNTIME_SERVER_PORT": "9000", "EDGE_RUNTIME_CLOUD_TOKEN": "t"}
    assert load_runtime_settings(data={}, env=env).server.port == 9000  # known names and the cache's own are fine
    for load, env in ((lambda e: load_bridge_settings(data={}, env=e), {"CLOUD_BRIDGE_SERVER_ADRESS": "x"}),
                      (lambda e: load_settings(PowerSettings, env=e, env_prefix="EDGE_RUNTIME_POWER"), {"EDGE_RUNTIME_POWER_SORCE": "x"})):
        with pytest.raises(ConfigError) as info:
            load(env)
        assert info.value.field == next(iter(env))


def test_a_misspelt_section_in_the_environment_is_warned_about(caplog):
    from edge_runtime.settings import load_runtime_settings

    env = {"EDGE_RUNTIME_CLOU_ADDRESS": "10.0.0.1:50051", "EDGE_RUNTIME_CACHE": "/tmp/x",  # CLOUD
           "EDGE_RUNTIME_OPENAI_KEY": "sk-x"}  # another variable sharing the prefix: not a misspelt setting
    settings = load_runtime_settings(data={}, env=env)
    assert settings.cloud.address != "10.0.0.1:50051"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "EDGE_RUNTIME_CLOU_ADDRESS is not a setting" in warned[0]
    assert "EDGE_RUNTIME_CLOUD_" in warned[0]
    # a table-valued setting misspelt: the daemon ran the default policy (which escalates) without a word
    caplog.clear()
    settings = load_runtime_settings(data={}, env={"EDGE_RUNTIME_POLCY": '{type = "never"}'})
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "EDGE_RUNTIME_POLCY is not a setting" in warned[0] and "EDGE_RUNTIME_POLICY" in warned[0]


def test_building_the_cli_parser_loads_neither_the_daemon_nor_the_settings_model():
    import subprocess
    import sys

    code = ("import sys, edge_runtime.cli; edge_runtime.cli.build_parser();"
            "print(','.join(m for m in ('edge_runtime.settings', 'edge_runtime.daemon', 'starlette', 'uvicorn', 'grpc')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_relative_paths_in_the_config_file_follow_the_file(tmp_path, monkeypatch):
    """As the bridge's do: a config (or the explorer's recommended.toml) then loads from any directory."""
    from edge_runtime.settings import load_runtime_settings

    conf = tmp_path / "conf"
    (conf / "my-bundle").mkdir(parents=True)
    (conf / "my-bundle" / "manifest.json").write_text("{}")
    (conf / "edge-runtime.toml").write_text(
        'policy = {type = "threshold", p = 0.5}\n'
        '[engine]\nbundle = "my-bundle"\nestimator = "estimator.json"\n'
        '[cloud]\naddress = "127.0.0.1:50051"\ntoken_file = "device.token"\nca_file = "/etc/ca.pem"\n'
        '[power]\nsysfs_root = "fake-sys"\n[server]\ngrpc_socket = "daemon.sock"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_runtime_settings(conf / "edge-runtime.toml", env={})
    assert s.engine.estimator == conf / "estimator.json" and s.cloud.token_file == conf / "device.token"
    assert s.engine.bundle == str(conf / "my-bundle") and s.power.sysfs_root == conf / "fake-sys"
    assert str(s.cloud.ca_file) == "/etc/ca.pem"
    assert s.server.grpc_socket == str(conf / "daemon.sock")  # under systemd the working directory is /
    # a bridge on a Unix socket beside the file: the bridge's own config resolves it the same way, so they meet
    (conf / "unix.toml").write_text('[cloud]\naddress = "unix:bridge.sock"\ninsecure = true\n')
    assert load_runtime_settings(conf / "unix.toml", env={}).cloud.address == f"unix:{conf / 'bridge.sock'}"
    # a bundle value that is no bundle next to the file stays a model name, even with a folder of that name there
    # (the checkout quantize read): it became a path that was no bundle, and the daemon exited
    (conf / "smollm2-135m-instruct").mkdir()
    (conf / "edge-runtime.toml").write_text('[engine]\nbundle = "smollm2-135m-instruct"\n')
    assert load_runtime_settings(conf / "edge-runtime.toml", env={}).engine.bundle == "smollm2-135m-instruct"
    # the environment and flags keep the working directory's meaning
    env = {"EDGE_RUNTIME_ENGINE_ESTIMATOR": "est.json"}
    assert load_runtime_settings(conf / "edge-runtime.toml", env=env).engine.estimator == Path("est.json")
    over = {"cloud": {"token_file": "t.token"}}
    assert load_runtime_settings(conf / "edge-runtime.toml", env={}, overrides=over).cloud.token_file == Path("t.token")


def test_tables_and_arrays_from_the_environment_and_a_policy_field_set_alone(monkeypatch):
    from edge_runtime.errors import ConfigError
    from edge_runtime.settings import load_runtime_settings

    # the help's TOML inline example works as well as JSON
    toml_env = {"EDGE_RUNTIME_POLICY": '{chain = [{type = "always"}]}'}
    assert load_runtime_settings(data={}, env=toml_env).policy == {"chain": [{"type": "always"}]}
    json_env = {"EDGE_RUNTIME_ENGINE_PROVIDERS": '["CPUExecutionProvider"]'}
    assert load_runtime_settings(data={}, env=json_env).engine.providers == ["CPUExecutionProvider"]
    assert load_runtime_settings(data={}, env={"EDGE_RUNTIME_ENGINE_PROVIDERS": "A, B"}).engine.providers == ["A", "B"]
    # EDGE_RUNTIME_POLICY_CHAIN used to be ignored silently; the policy is one table
    for env, field in (({"EDGE_RUNTIME_POLICY_CHAIN": '[{"type": "always"}]'}, "EDGE_RUNTIME_POLICY_CHAIN"),
                       ({"EDGE_RUNTIME_POLICY": "{type ="}, "policy"),
                       ({"EDGE_RUNTIME_ENGINE_PROVIDERS": "[nope"}, "engine.providers")):
        with pytest.raises(ConfigError) as info:
            load_runtime_settings(data={}, env=env)
        assert info.value.field == field


def test_a_missing_bundle_or_estimator_names_its_setting(tiny_bundle, tmp_path):
    from edge_runtime.errors import BundleNotFoundError, ConfigError
    from edge_runtime.hybrid import HybridRuntime
    from edge_runtime.settings import load_runtime_settings

    # refused with the settings, before the daemon binds: an empty bundle was the working directory, and an
    # unknown precision was blamed on engine.bundle with advice to build it with a precision quantize refuses
    for engine, field in (({"bundle": ""}, "engine.bundle"), ({"bundle": " "}, "engine.bundle"),
                          ({"precision": "int5"}, "engine.precision"), ({"precision": "INT4"}, "engine.precision"),
                          ({"precision": ""}, "engine.precision")):
        with pytest.raises(ConfigError) as info:
            load_runtime_settings(data={"engine": engine}, env={})
        assert info.value.field == field
    assert load_runtime_settings(data={"engine": {"precision": "int4-offsets"}}, env={}).engine.precision == "int4-offsets"

    # the same class as Engine() raises for it: `except BundleNotFoundError` catches both
    with pytest.raises(BundleNotFoundError, match=r"^engine\.bundle: bundle not found: nosuch-model"):
        HybridRuntime.from_settings(load_runtime_settings(data={"engine": {"bundle": "nosuch-model"}}, env={}))
    data = {"engine": {"bundle": str(tiny_bundle), "estimator": str(tmp_path / "missing.json")}}
    with pytest.raises(ConfigError, match="estimator file not found") as info:
        HybridRuntime.from_settings(load_runtime_settings(data=data, env={}))
    assert info.value.field == "engine.estimator"
    # the engine's own argument names become the settings' names: the daemon's log line is all a user sees
    data = {"engine": {"bundle": str(tiny_bundle), "providers": ["XnnpackExecutionProvider"]}}
    with pytest.raises(ConfigError, match=r"^engine\.providers: execution provider\(s\) XnnpackExecutionProvider") as info:
        HybridRuntime.from_settings(load_runtime_settings(data=data, env={}))
    assert info.value.field == "engine.providers"


def test_the_default_socket_is_in_the_runtime_dir_else_in_the_cache(monkeypatch, tmp_path):
    from edge_runtime.settings import default_socket_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    assert default_socket_path() == tmp_path / "run" / "edge-runtime.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == tmp_path / "cache" / "edge-runtime.sock"


def test_an_answer_delivered_past_its_deadline_or_during_a_drain_counts_as_answered():
    # Job.run returns from inside its loop, so every HTTP and unary gRPC request ends by closing the job's
    # generator: a job with a cancel reason must not turn a delivered answer into a timeout, nor drop its usage
    import types

    from edge_runtime.daemon._service import ChatService
    from edge_runtime.hybrid import HybridChunk, HybridResult
    from edge_runtime.settings import ServerSettings

    usage = {"local": {"prompt_tokens": 3, "completion_tokens": 2}, "cloud": {"prompt_tokens": 0, "completion_tokens": 0}}

    def result(**kw):
        return HybridResult(**{"request_id": "r", "text": "hello", "route": "local", "reason": "policy", "detail": "",
                               "p_correct": None, "threshold": None, "policy": "never", "model": "m",
                               "finish_reason": "stop", "draft": None, "tokens": [], "usage": usage,
                               "latency_ms": {}, "energy": {}, "cost": {}, **kw})

    service = ChatService(ServerSettings(request_timeout_s=0.2, queue_size=2))

    def late(messages, *, cancel, **kw):  # the last token lands past the deadline
        yield HybridChunk("text", text="hel")
        time.sleep(0.25)
        cancel()
        yield HybridChunk("done", result=result())

    def drained(messages, *, cancel, **kw):  # a drain cut the escalation; the whole local answer is the fallback
        yield HybridChunk("text", text="hello")
        service.cancel_all("shutdown")
        yield HybridChunk("done", result=result(route="fallback", reason="cancelled"))

    runtime = types.SimpleNamespace(default_max_new_tokens=8, cloud=None,
                                    engine=types.SimpleNamespace(max_sessions=1, eos_token_ids=(), model_name="m"))
    service.attach(runtime)
    for i, stream in enumerate((late, drained)):
        runtime.stream = stream
        job = service.open(parse_chat_request({"messages": ASK}, request_id=f"r{i}"), "http")
        assert job.run().text == "hello"
    text = service.metrics.render()
    assert metric(text, "edge_runtime_requests_total", transport="http", outcome="answered") == 2
    assert metric(text, "edge_runtime_tokens_total", side="local", kind="prompt") == 6


def test_escalations_of_requests_that_got_no_answer_still_count_their_cloud_spend():
    # a chat app's user pressing Stop while the cloud answers: the bridge bills what it generated, which the device
    # never learns; the job's result was dropped and neither cloud cost series moved
    import types

    from edge_runtime.daemon._service import ChatService, ClientGone
    from edge_runtime.hybrid import HybridChunk, HybridResult
    from edge_runtime.settings import ServerSettings

    usage = {"local": {"prompt_tokens": 3, "completion_tokens": 2}, "cloud": {"prompt_tokens": 0, "completion_tokens": 0}}

    def result(**kw):
        return HybridResult(**{"request_id": "r", "text": "hello", "route": "local_forced", "reason": "cancelled",
                               "detail": "", "p_correct": None, "threshold": None, "policy": "always", "model": "m",
                               "finish_reason": "stop", "draft": None, "tokens": [], "usage": usage,
                               "latency_ms": {}, "energy": {}, **kw})

    service = ChatService(ServerSettings(queue_size=2))
    jobs = []

    def stopped(messages, *, cancel, **kw):  # the client leaves while the bridge answers
        jobs[-1].cancel("client_gone")
        yield HybridChunk("done", result=result(cost={"cloud_usd": 0.0, "cloud_usd_unknown": True}))

    runtime = types.SimpleNamespace(default_max_new_tokens=8, cloud=None, stream=stopped,
                                    engine=types.SimpleNamespace(max_sessions=1, eos_token_ids=(), model_name="m"))
    service.attach(runtime)
    jobs.append(service.open(parse_chat_request({"messages": ASK}, request_id="r0"), "http"))
    with pytest.raises(ClientGone):
        jobs[-1].run()
    text = service.metrics.render()
    assert metric(text, "edge_runtime_requests_total", transport="http", outcome="cancelled") == 1
    assert metric(text, "edge_runtime_cloud_cost_unknown_total") == 1
    assert metric(text, "edge_runtime_answers_total") == 0  # still no answer

    # an answer the bridge billed and the transport could not deliver: its bill is counted too
    def billed(messages, *, cancel, **kw):
        yield HybridChunk("done", result=result(route="cloud", reason="policy",
                                                cost={"cloud_usd": 0.25, "cloud_usd_unknown": False}))

    runtime.stream = billed
    job = service.open(parse_chat_request({"messages": ASK}, request_id="r1"), "grpc")
    for chunk in job.iterate():
        if chunk.result is not None:
            job.mark_undelivered()
    text = service.metrics.render()
    assert metric(text, "edge_runtime_requests_total", transport="grpc", outcome="answered") == 0
    assert metric(text, "edge_runtime_cloud_cost_usd_total") == 0.25
    assert metric(text, "edge_runtime_cloud_cost_unknown_total") == 1

def test_openais_developer_role_is_read_as_system():
    # OpenAI's current clients send instructions as "developer"; it was refused as an unknown role
    req = parse_chat_request({"messages": [{"role": "developer", "content": "Answer briefly."}, *ASK]})
    assert [m["role"] for m in req.messages] == ["system", "user"]
    with pytest.raises(InvalidRequestError, match="expected one of system, developer, user, assistant, tool"):
        parse_chat_request({"messages": [{"role": "bogus", "content": "x"}]})  # the roles it takes, developer too


@pytest.mark.parametrize("value", [0, -3])
def test_a_bad_cache_size_is_refused_with_the_settings_not_after_the_daemon_listens(value):
    # the engine refused it, but only after the start-up log said "listening on ...; loading the model"
    from edge_runtime.errors import ConfigError
    from edge_runtime.settings import load_runtime_settings

    for source in ({"data": {"engine": {"cache_tokens": value}}, "env": {}},
                   {"data": {}, "env": {"EDGE_RUNTIME_ENGINE_CACHE_TOKENS": str(value)}}):
        with pytest.raises(ConfigError) as info:
            load_runtime_settings(**source)
        assert info.value.field == "engine.cache_tokens"


def test_escalations_the_bridge_may_have_billed_without_a_bill_are_counted():
    from types import SimpleNamespace

    m = Metrics()
    for unknown in (True, False, True):
        m.observe_answer(SimpleNamespace(
            route="fallback", reason="cloud_error", energy={"joules": 0.0}, predictions={}, cached_prompt_tokens=0,
            cost={"cloud_usd": 0.0, "device_energy_usd": 0.0, "cloud_usd_unknown": unknown},
            usage={"local": {"prompt_tokens": 1, "completion_tokens": 1}, "cloud": {"prompt_tokens": 0, "completion_tokens": 0}},
        ), queue_s=0.0, total_s=0.1)
    text = m.render()
    assert metric(text, "edge_runtime_cloud_cost_unknown_total") == 2 and metric(text, "edge_runtime_cloud_cost_usd_total") == 0


def test_failed_escalations_are_counted_by_their_error():
    from types import SimpleNamespace

    m = Metrics()
    for error, kind in (("deadline", "CloudTimeoutError"), ("cloud skipped", "CircuitOpenError"),
                        ("x", "CloudTimeoutError"), ("the bridge answered with no text", "EmptyAnswer"),
                        ("from an older runtime", None), (None, None)):
        m.observe_answer(SimpleNamespace(
            route="fallback" if error else "local", reason="cloud_error", energy={"joules": 0.0}, predictions={},
            cached_prompt_tokens=0, cost={"cloud_usd": 0.0, "device_energy_usd": 0.0}, cloud_error=error,
            cloud_error_type=kind,
            usage={"local": {"prompt_tokens": 1, "completion_tokens": 1}, "cloud": {"prompt_tokens": 0, "completion_tokens": 0}},
        ), queue_s=0.0, total_s=0.1)
    text = m.render()
    assert metric(text, "edge_runtime_cloud_errors_total", error="CloudTimeoutError") == 2
    assert metric(text, "edge_runtime_cloud_errors_total", error="CircuitOpenError") == 1
    assert metric(text, "edge_runtime_cloud_errors_total", error="EmptyAnswer") == 1
    assert metric(text, "edge_runtime_cloud_errors_total", error="other") == 1


def test_the_servers_log_lines_carry_the_time(tmp_path):
    # the daemon's had none, unlike the bridge's: its escalations could not be lined up with the bridge's billing lines
    import re
    import subprocess
    import sys

    # warned about, at load; in a time zone far from UTC, which budget windows and the bridge's billing use
    env = {**os.environ, "EDGE_RUNTIME_PORT": "1", "EDGE_RUNTIME_CACHE": str(tmp_path), "TZ": "Asia/Tokyo"}
    run = subprocess.run([sys.executable, "-c", "from edge_runtime.cli import main; raise SystemExit(main())", "serve",
                          "--server-queue-size", "0"], env=env, capture_output=True, text=True, timeout=60)
    warning = next(line for line in run.stderr.splitlines() if "EDGE_RUNTIME_PORT" in line)
    assert run.returncode == 1 and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING ", warning), warning
    from datetime import datetime, timezone

    stamped = datetime.strptime(warning[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    assert abs((datetime.now(timezone.utc) - stamped).total_seconds()) < 120  # UTC, not Tokyo's local time


def test_refusal_lines_are_key_value_with_the_message_quoted(caplog):
    # they were free text: "(server.queue_size = 2)" broke logfmt readers, which dropped exactly the 429 lines
    import json

    from edge_runtime.daemon._service import ChatService
    from edge_runtime.settings import ServerSettings

    service = ChatService(ServerSettings())
    with caplog.at_level("INFO", logger="edge_runtime.daemon"):
        service.refused("http", QueueFullError("busy (server.queue_size = 2)\nforged=1"), "rid-1")
        service.refused_at_the_door("/v1/chat/completions", "forbidden_origin", "cross-origin request refused")
    busy, door = (r.getMessage() for r in caplog.records[-2:])
    head, _, quoted = busy.partition(" message=")
    assert head == "http rid-1 request refused: outcome=rejected error=QueueFullError" and "\n" not in busy
    assert json.loads(quoted) == "busy (server.queue_size = 2)\nforged=1"
    assert door.startswith('http - request refused: outcome=invalid error=forbidden_origin path="/v1/chat/completions" ')
