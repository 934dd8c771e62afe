"""The bridge's config file, environment and flags, and the cloud-bridge command line (serve and token)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_bridge import EchoModelSettings, OnnxModelSettings, OpenAIModelSettings, create_server, load_bridge_settings
from cloud_bridge.cli import main
from edge_runtime.cloud import CloudClient
from edge_runtime.errors import ConfigError

CONFIG = """
[server]
address = "127.0.0.1:0"
grace_period_s = 2

[auth]
tokens_file = "secrets/tokens.toml"

[quota]
requests_per_minute = 120

[models.coder]
backend = "onnx"
bundle = "bundles/qwen"
workers = 2

[models.gpt]
backend = "openai"
base_url = "https://api.example.com/v1"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
usd_per_million_input_tokens = 0.15
usd_per_million_output_tokens = 0.6
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


def test_config_file_env_and_overrides(tmp_path):
    path = write(tmp_path, CONFIG)
    settings = load_bridge_settings(
        path, env={"CLOUD_BRIDGE_QUOTA_REQUESTS_PER_MINUTE": "30"}, overrides={"server": {"address": "127.0.0.1:7000"}}
    )
    assert settings.server.address == "127.0.0.1:7000"  # flag beats file
    assert settings.quota.requests_per_minute == 30.0  # env beats file
    assert settings.auth.tokens_file == tmp_path / "secrets" / "tokens.toml"  # relative to the config file
    coder, gpt = settings.models["coder"], settings.models["gpt"]
    assert isinstance(coder, OnnxModelSettings) and coder.bundle == tmp_path / "bundles" / "qwen" and coder.workers == 2
    assert isinstance(gpt, OpenAIModelSettings) and gpt.workers == 8  # the openai backend's own default
    assert gpt.cost_usd(1_000_000, 500_000) == pytest.approx(0.15 + 0.3)
    assert settings.default_model == "coder"


def test_relative_paths_from_flags_and_env_follow_the_working_directory(tmp_path, monkeypatch):
    cfg = tmp_path / "cfgdir"
    cfg.mkdir()
    path = write(cfg, '[server]\ntls_cert = "file-cert.pem"\ntls_key = "file-key.pem"\n')
    monkeypatch.chdir(tmp_path)
    from_file = load_bridge_settings(path, env={})
    assert from_file.server.tls_cert == cfg / "file-cert.pem"  # written in the file: next to the file
    assert from_file.auth.tokens_file == cfg / "bridge-tokens.toml"  # the default too
    given = load_bridge_settings(path, env={"CLOUD_BRIDGE_AUTH_TOKENS_FILE": "env-tokens.toml"},
                                 overrides={"server": {"tls_cert": "cert.pem", "tls_key": "key.pem"}})
    # typed in a shell: where the shell is, as the daemon's
    assert given.server.tls_cert == tmp_path / "cert.pem" and given.server.tls_key == tmp_path / "key.pem"
    assert given.auth.tokens_file == tmp_path / "env-tokens.toml"
    # the default's own name, given in the environment, is the working directory's too
    same = load_bridge_settings(path, env={"CLOUD_BRIDGE_AUTH_TOKENS_FILE": "bridge-tokens.toml"})
    assert same.auth.tokens_file == tmp_path / "bridge-tokens.toml"
    # a models table from the environment replaces the file's whole: its bundles are the working directory's
    env_models = load_bridge_settings(path, env={"CLOUD_BRIDGE_MODELS": '{"x": {"backend": "onnx", "bundle": "b"}}'})
    assert env_models.models["x"].bundle == tmp_path / "b"
    in_file = load_bridge_settings(write(cfg, '[models.x]\nbackend = "onnx"\nbundle = "b"\n'), env={})
    assert in_file.models["x"].bundle == cfg / "b"


def test_a_bad_device_id_names_where_it_was_written(tmp_path):
    from cloud_bridge import TokenStore

    with pytest.raises(ConfigError) as info:
        TokenStore({"bad id!": "sha256:" + "0" * 64})
    assert info.value.field == "auth.tokens"
    tokens = tmp_path / "t.toml"
    tokens.write_text('[devices]\n"bad id!" = "sha256:' + "0" * 64 + '"\n')
    with pytest.raises(ConfigError) as info:
        TokenStore({}, tokens_file=tokens)
    assert info.value.field == "auth.tokens_file"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('[models.x]\nbackend = "gguf"\n', "models.x.backend"),
        ('[models.x]\nbackend = "echo"\nreplly = "typo"\n', "models.x.replly"),
        ('[models.x]\nbackend = "onnx"\n', "models.x.bundle"),
        ('[models.x]\nbackend = "openai"\nbase_url = "ftp://x"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "echo"\nworkers = 0\n', "models.x.workers"),
        ('[limits]\ndefault_model = "nope"\n[models.x]\nbackend = "echo"\n', "limits.default_model"),
        ('[server]\ntls_cert = "a.pem"\n', "server.tls_cert"),
        ("[quota]\nrequests_per_minute = -1\n", "quota.requests_per_minute"),
        ("[quota]\nrequests_per_minute = nan\n", "quota.requests_per_minute"),  # nan > 0 is false: no quota
        ("[server]\ngrace_period_s = nan\n", "server.grace_period_s"),
        ("[server]\nmax_message_bytes = 1099511627776\n", "server.max_message_bytes"),  # past gRPC's int32
        ('[models.x]\nbackend = "echo"\nusd_per_million_output_tokens = -1\n', "models.x.usd_per_million_output_tokens"),
        ('[models.x]\nbackend = "echo"\nusd_per_million_input_tokens = inf\n', "models.x.usd_per_million_input_tokens"),
        ('[models.x]\nbackend = "openai"\nbase_url = "http://h"\nmodel = "m"\nconnect_timeout_s = -1\n',
         "models.x.connect_timeout_s"),
        ('[models.x]\nbackend = "openai"\nbase_url = "http://h:99999/v1"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "openai"\nbase_url = "http://h"\nmodel = "m"\nmax_tokens_field = "max_new_tokens"\n',
         "models.x.max_tokens_field"),
        # stop cannot be left out: the upstream would answer past the device's stop string
        ('[models.x]\nbackend = "openai"\nbase_url = "http://h"\nmodel = "m"\nomit_params = ["temperature", "stop"]\n',
         "models.x.omit_params"),
        ('[models.x]\nbackend = "openai"\nbase_url = "http://[::1/v1"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "openai"\nbase_url = "http://h:abc/v1"\nmodel = "m"\n', "models.x.base_url"),
        # credentials in the URL are never sent, and the error does not echo them
        ('[models.x]\nbackend = "openai"\nbase_url = "https://alice:hunter2@h/v1"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "openai"\nbase_url = "https://alice:hunter2@h:99999/v1"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "openai"\nbase_url = "ftp://alice:hunter2@h/v1"\nmodel = "m"\n', "models.x.base_url"),
        # a password with a "/" ends the authority early: "alice:hunter2" was taken for host and port
        ('[models.x]\nbackend = "openai"\nbase_url = "https://alice:hunter2/x@h/v1"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "openai"\nbase_url = "https://alice:12345/hunter2@h/v1"\nmodel = "m"\n', "models.x.base_url"),
        ('[models.x]\nbackend = "openai"\nbase_url = "https://h:hunter2/v1"\nmodel = "m"\n', "models.x.base_url"),
        ("[auth]\nreload_interval_s = -5\n", "auth.reload_interval_s"),
        ("[auth]\nreload_interval_s = 1e308\n", "auth.reload_interval_s"),  # a revoked token would keep working
    ],
)
def test_bad_config_names_the_field(tmp_path, extra, field):
    with pytest.raises(ConfigError) as info:
        load_bridge_settings(write(tmp_path, extra), env={})
    assert info.value.field == field and "hunter2" not in str(info.value)


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes("[server]\n".encode("utf-16"))  # as a Windows editor may save it
    for path, message in ((bad, "is not UTF-8 text"), (tmp_path, "cannot read the config file")):
        assert main(["config", "--config", str(path)]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_models_given_as_objects_are_kept():
    settings = load_bridge_settings(data={"models": {"e": EchoModelSettings(reply="x")}}, env={})
    assert settings.models["e"].reply == "x"


def test_token_add_prints_the_token_once_and_stores_its_hash(tmp_path, capsys):
    path = write(tmp_path, CONFIG)
    assert main(["token", "add", "pi-kitchen", "--config", str(path)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("ebt_") and "shown once" in out.err
    stored = (tmp_path / "secrets" / "tokens.toml").read_text()
    assert token not in stored and "pi-kitchen" in stored
    assert main(["token", "add", "pi-kitchen", "--config", str(path)]) == 1  # already has one
    assert "--replace" in capsys.readouterr().err
    assert main(["token", "list", "--config", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["pi-kitchen"]
    assert main(["token", "remove", "pi-kitchen", "--config", str(path)]) == 0
    assert main(["token", "remove", "pi-kitchen", "--config", str(path)]) == 1


def test_token_commands_see_the_inline_token_hashes_the_bridge_trusts(tmp_path, capsys):
    # the bridge takes an inline [auth] tokens hash over the file's: a token added or replaced in the file for
    # such a device was printed and never accepted (the old one kept working), and `token list` left it out
    inline = "sha256:" + "0" * 64
    path = write(tmp_path, CONFIG + f'\n[auth.tokens]\n"legacy" = "{inline}"\n')
    assert main(["token", "add", "fresh", "--config", str(path)]) == 0
    capsys.readouterr()
    for command in (["token", "add", "legacy"], ["token", "add", "legacy", "--replace"], ["token", "remove", "legacy"]):
        assert main([*command, "--config", str(path)]) == 1
        out = capsys.readouterr()
        assert "auth.tokens.legacy" in out.err and "ebt_" not in out.out
    assert "legacy" not in (tmp_path / "secrets" / "tokens.toml").read_text()
    assert main(["token", "list", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["fresh", "legacy"] and "[auth] tokens" in out.err and "0" * 64 not in out.err


def test_config_command_hides_secrets(tmp_path, capsys):
    path = write(tmp_path, CONFIG + '\n[auth.tokens]\n"dev" = "sha256:' + "0" * 64 + '"\n')
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"tokens": "***"' in out and "0" * 64 not in out and '"backend": "openai"' in out


def test_config_command_refuses_a_token_written_in_clear_as_serve_does_without_echoing_it(tmp_path, capsys):
    # `config` printed the settings and exited 0; `serve` refused them
    path = write(tmp_path, CONFIG + '\n[auth.tokens]\n"dev" = "ebt_cleartextsecret"\n')
    for command in ("config", "serve"):
        assert main([command, "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert "auth.tokens.dev" in err and "never a token in clear" in err and "cleartextsecret" not in err


def test_serve_refuses_plaintext_off_loopback(tmp_path, capsys):
    path = write(tmp_path, '[models.e]\nbackend = "echo"\n')
    assert main(["serve", "--config", str(path), "--insecure", "--server-address", "0.0.0.0:0"]) == 1
    assert "loopback" in capsys.readouterr().err
    assert main(["serve", "--config", str(path), "--server-address", "127.0.0.1:0"]) == 1
    assert "--insecure" in capsys.readouterr().err


def _tgkill(pid: int, sig: int) -> bool:
    """Send ``sig`` to one thread of ``pid`` other than the main one that does not block it (Linux only)."""
    import ctypes
    import platform

    number = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    if sys.platform != "linux" or number is None:
        return False
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        if tid == pid:
            continue
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        if not blocked & (1 << (sig - 1)):
            return ctypes.CDLL(None, use_errno=True).syscall(number, pid, tid, sig) == 0
    return False


@pytest.mark.parametrize("to_thread", [False, True], ids=["to-process", "to-a-grpc-thread"])
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_serve_answers_and_drains_on_sigterm(tmp_path, to_thread, sig, status):
    # SIGHUP killed the bridge at once (Python's default) with no log line; now it drains as SIGTERM does and
    # exits 129, which systemd's Restart=on-failure restarts (settings are read only at start)
    path = write(tmp_path, '[server]\naddress = "127.0.0.1:0"\n[models.e]\nbackend = "echo"\nreply = "pong"\n')
    token = subprocess.run(
        [sys.executable, "-m", "cloud_bridge.cli", "token", "add", "dev2", "--config", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_bridge.cli", "serve", "--config", str(path), "--insecure"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "on port" in line:
                port = int(line.rsplit(" ", 1)[-1])
        assert port, "the bridge did not report its port"
        with CloudClient(address=f"127.0.0.1:{port}", token=token, insecure=True, timeout_s=10) as client:
            assert client.generate([{"role": "user", "content": "ping"}]).text == "pong"
        # the kernel may hand a process's signal to any thread; the second case makes it a gRPC thread
        if not to_thread:
            proc.send_signal(sig)
        elif not _tgkill(proc.pid, sig):
            pytest.skip("sending a signal to one thread needs Linux on x86_64 or aarch64")
        assert proc.wait(15) == status
        rest = proc.stderr.read()
        assert token not in rest and f"{sig.name}: shutting down" in rest
        if sig == signal.SIGHUP:
            assert "SIGHUP: settings are read only at start; draining and stopping (restart to apply changes)" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT], ids=["nohup", "background-job"])
def test_a_server_started_with_a_stop_signal_ignored_keeps_ignoring_it(tmp_path, ignored):
    # nohup's request (SIGHUP), a shell's background job's (SIGINT: a Ctrl-C at the terminal is not for it): the
    # servers' handlers replaced them, and a closed terminal or a Ctrl-C stopped the server
    path = write(tmp_path, '[server]\naddress = "127.0.0.1:0"\n[models.e]\nbackend = "echo"\nreply = "pong"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_bridge.cli", "serve", "--config", str(path), "--insecure"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(ignored, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "on port" not in proc.stderr.readline():
            pass
        proc.send_signal(ignored)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(2)  # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert ignored.name not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_token_commands_take_a_tokens_file_without_a_config(tmp_path, capsys):
    path = tmp_path / "t.toml"
    assert main(["token", "add", "edge-1", "--tokens-file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("ebt_") and token not in path.read_text()


@pytest.mark.parametrize("command", [["add", "edge-1"], ["list"], ["remove", "edge-1"]])
def test_an_empty_tokens_file_flag_is_refused_not_read_as_the_default_file(tmp_path, monkeypatch, capsys, command):
    # `--tokens-file "$UNSET"` added the device to ./bridge-tokens.toml (or the config's file) and exit 0
    monkeypatch.chdir(tmp_path)
    assert main(["token", "add", "edge-1"]) == 0
    before = (tmp_path / "bridge-tokens.toml").read_text()
    capsys.readouterr()
    assert main(["token", *command, "--tokens-file", ""]) == 1
    out = capsys.readouterr()
    assert "--tokens-file: must name a file" in out.err and out.out == ""
    assert (tmp_path / "bridge-tokens.toml").read_text() == before


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:5o051", "127.0.0.1:", "127.0.0.1", "::1:50051"],
)
def test_a_port_out_of_range_or_a_malformed_address_names_server_address(address):
    # gRPC itself would take port 99999 as 34463, and a missing port as 443
    with pytest.raises(ConfigError) as info:
        load_bridge_settings(data={"server": {"address": address}}, env={})
    assert info.value.field == "server.address"
    with pytest.raises(ConfigError) as info:
        create_server(address, insecure=True)
    assert info.value.field == "server.address"


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "127.0.0.1:65535", "[::1]:50051", "localhost:8080", "unix:/run/b.sock"]
)
def test_valid_server_addresses_are_accepted(address):
    assert load_bridge_settings(data={"server": {"address": address}}, env={}).server.address == address


def test_backend_errors_at_start_name_the_model_alias(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_VARIABLE_FOR_TESTS", raising=False)
    cases = [
        (
            '[models.gpt]\nbackend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
            'api_key_env = "NO_SUCH_VARIABLE_FOR_TESTS"\n',
            "models.gpt.api_key_env",
        ),
        ('[models.coder]\nbackend = "onnx"\nbundle = "no-such-bundle"\n', "models.coder.bundle"),
    ]
    for text, field in cases:
        settings = load_bridge_settings(write(tmp_path, '[server]\naddress = "127.0.0.1:0"\n' + text), env={})
        with pytest.raises(ConfigError) as info:
            create_server(settings, insecure=True)
        assert info.value.field == field
        assert str(info.value).startswith(f"{field}: ") and str(info.value).count(field) == 1


def test_an_api_key_typed_into_api_key_env_is_refused_and_never_shown(tmp_path, capsys):
    # `cloud-bridge config` printed it ("secrets hidden"), and serve said "environment variable sk-... is not set"
    text = ('[models.gpt]\nbackend = "openai"\nbase_url = "https://api.example.com/v1"\nmodel = "m"\n'
            'api_key_env = "sk-proj-REALKEY1234567890abcdef"\n')
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_bridge_settings(path, env={})
    assert info.value.field == "models.gpt.api_key_env" and "REALKEY" not in str(info.value)
    assert main(["config", "--config", str(path)]) != 0
    printed = capsys.readouterr()
    assert "REALKEY" not in printed.out + printed.err


def test_lowering_the_token_cap_alone_is_accepted_and_the_default_follows_it(tmp_path):
    settings = load_bridge_settings(write(tmp_path, '[models.x]\nbackend = "echo"\n'), env={},
                                    overrides={"limits": {"max_new_tokens": 100}})
    assert settings.limits.max_new_tokens == 100  # the default of 256 is cut to the cap where it is used


@pytest.mark.parametrize("command", [["cloud_bridge.cli", "config"], ["edge_runtime.cli", "power", "--json"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(command):
    # `cloud-bridge config | head -1`: no "Broken pipe" error, no traceback when Python flushes stdout at exit
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", *command], stdout=write_end, stderr=subprocess.PIPE,
                            env={**os.environ, "CLOUD_BRIDGE_AUTH_TOKENS_FILE": os.devnull})
    os.close(write_end)
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == "", err


def test_a_token_limit_above_what_requests_may_ask_is_capped_not_advertised(tmp_path, caplog):
    settings = load_bridge_settings(write(tmp_path, "[limits]\nmax_new_tokens = 100000\n"), env={})
    assert settings.limits.max_new_tokens == 65536  # requests above it are refused anyway
    assert any("limits.max_new_tokens 100000" in r.getMessage() for r in caplog.records)


def test_a_relative_unix_socket_in_the_file_follows_the_file(tmp_path, monkeypatch):
    # under systemd the working directory is /: the socket went there
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "bridge.toml"
    path.write_text('[server]\naddress = "unix:bridge.sock"\n[models.e]\nbackend = "echo"\n')
    assert load_bridge_settings(path, env={}).server.address == f"unix:{conf / 'bridge.sock'}"
    given = load_bridge_settings(path, env={"CLOUD_BRIDGE_SERVER_ADDRESS": "unix:here.sock"}).server.address
    assert given == "unix:here.sock"  # the environment's and a flag's are the working directory's
    path.write_text('[server]\naddress = "unix:/run/b.sock"\n[models.e]\nbackend = "echo"\n')
    assert load_bridge_settings(path, env={}).server.address == "unix:/run/b.sock"
    path.write_text('[server]\naddress = "unix:~/b.sock"\n[models.e]\nbackend = "echo"\n')  # gRPC takes ~ literally
    assert load_bridge_settings(path, env={}).server.address == f"unix:{Path.home() / 'b.sock'}"


def test_token_commands_refuse_a_file_that_is_not_regular_and_name_it(tmp_path, capsys):
    fifo = tmp_path / "tokens.fifo"
    os.mkfifo(fifo)
    for argv in (["token", "add", "d1", "--tokens-file", str(fifo)], ["token", "list", "--tokens-file", str(fifo)]):
        assert main(argv) == 1  # it blocked until killed
        err = capsys.readouterr().err
        assert "auth.tokens_file" in err and "not a regular file" in err and "Traceback" not in err
    (tmp_path / "afile").write_text("")
    assert main(["token", "add", "d1", "--tokens-file", str(tmp_path / "afile" / "t.toml")]) == 1
    err = capsys.readouterr().err
    assert "auth.tokens_file" in err and "Traceback" not in err


def test_a_token_that_could_not_be_shown_is_not_kept(tmp_path):
    # printed after its hash was stored: with stdout on a full disk it was lost, and the next add needed --replace
    path = tmp_path / "t.toml"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "cloud_bridge.cli", "token", "add", "d1", "--tokens-file", str(path)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not path.exists()
    assert main(["token", "add", "d1", "--tokens-file", str(path)]) == 0


def test_token_add_with_stdout_closed_keeps_nothing(tmp_path):
    # print() does nothing when the process starts with stdout closed: the token was stored, never shown
    path = tmp_path / "t.toml"
    proc = subprocess.run(["sh", "-c", f'"{sys.executable}" -m cloud_bridge.cli token add d1 --tokens-file "{path}" >&-'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "stdout" in proc.stderr and not path.exists()


def test_a_tokens_file_behind_a_symlink_is_updated_through_it(tmp_path, capsys):
    real = tmp_path / "real.toml"
    assert main(["token", "add", "d1", "--tokens-file", str(real)]) == 0
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    assert main(["token", "add", "d2", "--tokens-file", str(link)]) == 0  # was "is not a regular file"
    assert link.is_symlink() and '"d2" =' in real.read_text()
    assert main(["token", "remove", "d1", "--tokens-file", str(link)]) == 0
    assert link.is_symlink() and '"d1" =' not in real.read_text()  # (a hash's hex digits may hold "d1")


def test_a_change_to_the_tokens_file_waits_for_the_one_in_progress(tmp_path, monkeypatch):
    # ten `token add` at once stored six devices (four printed tokens never worked), and a `token remove` among
    # adds could come back undone: each read the file, changed it and wrote it back unlocked
    import threading

    from cloud_bridge import _auth

    tokens = tmp_path / "tokens.toml"
    _auth.add_device_token(tokens, "victim")
    read, go_on = threading.Event(), threading.Event()
    real_read = _auth.read_tokens_file

    def slow_read(path):
        out = real_read(path)
        if threading.current_thread().name == "adder":  # the add has read the file and not yet written it
            read.set()
            go_on.wait(10)
        return out

    monkeypatch.setattr(_auth, "read_tokens_file", slow_read)
    adder = threading.Thread(target=_auth.add_device_token, args=(tokens, "dev1"), name="adder")
    adder.start()
    assert read.wait(10)
    remover = threading.Thread(target=_auth.remove_device_token, args=(tokens, "victim"))
    remover.start()
    remover.join(0.3)
    assert remover.is_alive()  # it waits for the add in progress
    go_on.set()
    adder.join(10)
    remover.join(10)
    assert set(real_read(tokens)) == {"dev1"}  # the removal was not undone


def test_a_second_bridge_cannot_take_a_live_bridges_unix_socket(tmp_path):
    # gRPC unlinked the first bridge's socket and bound its own: the first ran on, unreachable
    sock = tmp_path / "run" / "bridge.sock"
    settings = load_bridge_settings(data={"server": {"address": f"unix:{sock}"}, "models": {"e": {"backend": "echo"}},
                                          "auth": {"tokens_file": None}}, env={})
    first, _ = create_server(settings, insecure=True)
    first.start()
    try:
        with pytest.raises(ConfigError, match="in use") as info:
            create_server(settings, insecure=True)
        assert info.value.field == "server.address"
    finally:
        first.stop(grace_s=0)
    import socket

    stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on: a bridge that was killed
    stale.bind(str(sock))
    stale.close()
    second, _ = create_server(settings, insecure=True)  # removed and bound
    second.stop(grace_s=0)


@pytest.mark.parametrize("umask, expected", [(0o002, 0o660), (0o022, 0o640), (0o077, 0o600)])
def test_a_bridges_unix_socket_is_its_users_and_groups_at_most(tmp_path, umask, expected):
    # it took the process's umask: group-writable under 002, and with --insecure tokens cross it in clear; a
    # stricter umask still wins
    import os
    import stat

    sock = tmp_path / "run" / "bridge.sock"
    settings = load_bridge_settings(data={"server": {"address": f"unix:{sock}"}, "models": {"e": {"backend": "echo"}},
                                          "auth": {"tokens_file": None}}, env={})
    old = os.umask(umask)
    try:
        server, _ = create_server(settings, insecure=True)
        assert os.umask(umask) == umask  # the bind gave the process's umask back
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == expected
    finally:
        server.stop(grace_s=0)


def test_config_command_hides_the_values_of_a_base_url_query(tmp_path, capsys):
    # a key in the query (?key=...) was printed as written
    path = write(tmp_path, CONFIG.replace("https://api.example.com/v1", "https://api.example.com/v1?api-version=1&key=QSECRET"))
    assert main(["config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "QSECRET" not in out and "https://api.example.com/v1?api-version=***&key=***" in out


def test_the_repr_of_the_settings_hides_the_values_of_a_base_url_query(tmp_path):
    # `cloud-bridge config` hid them (a key: Google's ?key=...), and repr() of the settings, for a debug log or a
    # traceback with locals, showed them
    url = "https://api.example.com/v1"
    path = write(tmp_path, CONFIG.replace(url, url + "?key=AIzaSECRETKEY0123456789"))
    settings = load_bridge_settings(path, env={})
    for text in (repr(settings), repr(settings.models["gpt"]), str(settings.models["gpt"])):
        assert "AIzaSECRETKEY" not in text and "base_url='https://api.example.com/v1?key=***'" in text
        assert "model='gpt-4o-mini'" in text


def test_token_list_names_a_tokens_file_that_is_not_there(tmp_path, capsys):
    # it printed nothing and exited 0, hiding a wrong path
    assert main(["token", "list", "--tokens-file", str(tmp_path / "nope.toml")]) == 1
    assert "tokens file not found" in capsys.readouterr().err


def test_the_auth_settings_have_flags_too_but_never_an_inline_token(tmp_path, capsys):
    # `cloud-bridge serve --help` is said to list every setting: auth.tokens_file had no flag
    import json

    assert main(["config", "--auth-tokens-file", str(tmp_path / "t.toml"), "--auth-reload-interval-s", "5"]) == 0
    auth = json.loads(capsys.readouterr().out)["auth"]
    assert auth["tokens_file"] == str(tmp_path / "t.toml") and auth["reload_interval_s"] == 5.0
    with pytest.raises(SystemExit):  # hashes on a command line: not a setting a flag may carry
        main(["config", "--auth-tokens", "x"])


@pytest.mark.parametrize("threads", [0, -1, 1025, 2**31])
def test_intra_op_threads_out_of_range_names_the_alias_in_serve_and_config(tmp_path, capsys, threads):
    # 2**31 was a traceback from onnxruntime; 0 an error without the alias; `config` accepted both
    path = write(tmp_path, f'[models.o]\nbackend = "onnx"\nbundle = "b"\nintra_op_threads = {threads}\n'
                           '[models.p]\nbackend = "onnx"\nbundle = "b"\n')
    with pytest.raises(ConfigError, match="must be from 1 to 1024") as info:
        load_bridge_settings(path, env={})
    assert info.value.field == "models.o.intra_op_threads"
    models = f'{{o = {{backend = "onnx", bundle = "b", intra_op_threads = {threads}}}}}'
    with pytest.raises(ConfigError) as info:
        load_bridge_settings(data={}, env={"CLOUD_BRIDGE_MODELS": models})
    assert info.value.field == "models.o.intra_op_threads"
    for command in ("config", "serve"):
        assert main([command, "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert "models.o.intra_op_threads: must be from 1 to 1024" in err and "Traceback" not in err, err


def test_an_engine_argument_the_onnx_backend_refuses_names_the_alias_and_setting(monkeypatch):
    from edge_runtime.errors import InvalidRequestError

    def refusing_engine(*_args, **_kwargs):
        raise InvalidRequestError("must be an integer >= 1, got 0", field="max_sessions")

    monkeypatch.setattr("edge_runtime.engine.Engine", refusing_engine)
    settings = load_bridge_settings(data={"models": {"o": {"backend": "onnx", "bundle": "/b"}}}, env={})
    with pytest.raises(ConfigError) as info:
        create_server(settings, insecure=True)
    assert info.value.field == "models.o.workers" and str(info.value).startswith("models.o.workers: must be")


def test_a_config_file_saved_with_a_utf8_byte_order_mark_is_read(tmp_path, capsys):
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[server]\naddress = "127.0.0.1:0"\n')
    assert load_bridge_settings(path, env={}).server.address == "127.0.0.1:0"
    assert main(["config", "--config", str(path)]) == 0
    assert '"address": "127.0.0.1:0"' in capsys.readouterr().out

