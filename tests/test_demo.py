"""The demo's own files: its bridge certificate and device token."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest

from edge_runtime import demo

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the demo makes its certificate with openssl")


def _expires_within_a_day(cert) -> bool:
    return subprocess.run(["openssl", "x509", "-checkend", "86400", "-noout", "-in", str(cert)],
                          capture_output=True).returncode != 0


@needs_openssl
def test_the_demo_certificate_is_private_reused_and_replaced_before_it_expires(tmp_path):
    cert, key = demo._certificate(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and not _expires_within_a_day(cert)
    first = cert.read_bytes()
    assert demo._certificate(tmp_path) == (cert, key) and cert.read_bytes() == first  # reused
    # one about to run out (the demo stopped working 30 days after its first run): made again
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    assert _expires_within_a_day(cert)
    demo._certificate(tmp_path)
    assert not _expires_within_a_day(cert) and stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.parametrize(("argv", "message"), [
    # Path("") is ".": the demo wrote its report into the working directory, over a recommended.toml there
    (["demo", "--out", ""], "is empty"),
    (["demo", "--out", "x", "--limit", "0"], "must be >= 1"),  # refused after the bundles and the bridge, before
])
def test_demo_arguments_are_refused_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    from edge_runtime.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_unwinds_a_command_like_ctrl_c(tmp_path):
    # Python's default is to die at once: a benchmark's runner, the demo's bridge and a build's staging directory
    # were left behind. Now the finally blocks run and the exit status is 128 + 15.
    import signal
    import sys

    code = ("import sys, time\n"
            "from edge_runtime.cli import main\n"
            "import edge_runtime.cli.power as power\n"
            "def slow(args):\n"
            "    try:\n"
            "        print('ready', flush=True); time.sleep(60)\n"
            "    finally:\n"
            "        open(sys.argv[1], 'w').write('unwound')\n"
            "power._run = slow\n"
            "sys.exit(main(['power']))\n")
    marker = tmp_path / "marker"
    with subprocess.Popen([sys.executable, "-c", code, str(marker)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143 and marker.read_text() == "unwound"


def test_a_demo_output_directory_that_cannot_be_used_is_refused_first(tmp_path, capsys, monkeypatch):
    # found by the explorer only after both bundles were built and the bridge started
    from edge_runtime.cli import main

    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("")
    assert main(["demo", "--out", str(tmp_path / "afile")]) == 1
    err = capsys.readouterr().err
    assert "out: cannot write to the output directory" in err
    assert not (tmp_path / "cache" / "bundles").exists()


# -- two demos at once: each pair of files is one pair -----------------------------------------------------------------

_DEMO_FILES_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from edge_runtime import demo
while not Path(sys.argv[2]).exists():  # a start line: every process asks at once
    time.sleep(0.005)
tokens, token = demo._device_token(Path(sys.argv[1]))
pair = demo._certificate(Path(sys.argv[1]))
print(tokens, token, *(pair or ()), flush=True)
"""


def _token_matches(tokens, token) -> bool:
    from cloud_bridge._auth import hash_token, read_tokens_file

    return read_tokens_file(tokens) == {"demo-device": hash_token(token.read_text().strip())}


def _pair_matches(cert, key) -> bool:
    def public(*args):
        return subprocess.run(["openssl", *args], capture_output=True, check=True).stdout

    return public("x509", "-pubkey", "-noout", "-in", str(cert)) == public("pkey", "-pubout", "-in", str(key))


@needs_openssl
def test_demos_started_at_once_share_one_certificate_pair_and_one_token_pair(tmp_path):
    # QA: the certificate of one demo was found beside the key of the other, and the device token of one beside
    # the tokens file hashing the other's (every escalation refused)
    import sys

    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _DEMO_FILES_IN_A_PROCESS, str(tmp_path), str(go)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    go.touch()
    outputs = {proc.communicate(timeout=60)[0] for proc in procs}
    assert [proc.returncode for proc in procs] == [0] * 4 and len(outputs) == 1
    tokens, token, cert, key = (tmp_path / p for p in outputs.pop().split())
    assert (tokens.parent, token.parent) == (tmp_path / "bridge-auth",) * 2
    assert (cert.parent, key.parent) == (tmp_path / "bridge-tls",) * 2
    assert _token_matches(tokens, token) and _pair_matches(cert, key)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".bridge-*.tmp-*"))


def test_threads_issuing_the_demo_token_at_once_get_one_token(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        results = set(pool.map(lambda _: demo._device_token(tmp_path), range(6)))
    assert len(results) == 1
    tokens, token = results.pop()
    assert _token_matches(tokens, token)
    assert demo._device_token(tmp_path) == (tokens, token) and _token_matches(tokens, token)  # kept by later runs


@needs_openssl
def test_a_certificate_that_is_not_its_keys_is_issued_again(tmp_path):
    cert, key = demo._certificate(tmp_path)
    other = tmp_path / "other"
    other_cert, _ = demo._certificate(other)
    cert.write_bytes(other_cert.read_bytes())  # what the race left: a valid certificate of another key
    assert not _pair_matches(cert, key)
    assert demo._certificate(tmp_path) == (cert, key) and _pair_matches(cert, key)


def test_a_demo_that_fails_before_the_explorer_leaves_no_output_directory(tmp_path, monkeypatch):
    # run_demo made --out first, so a failed bundle build or bridge left an empty directory behind
    import io

    from edge_runtime.errors import BundleError

    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))

    def no_bundle(name, steps):
        raise BundleError(f"cannot build {name}")

    monkeypatch.setattr(demo, "_bundle", no_bundle)
    with pytest.raises(BundleError):
        demo.run_demo(tmp_path / "runs" / "demo-out", out_stream=io.StringIO())
    assert not (tmp_path / "runs").exists()
