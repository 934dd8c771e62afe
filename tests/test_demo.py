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
