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
