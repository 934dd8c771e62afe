"""Shared fixtures: tiny random models and bundles (seconds), and the real default edge model (slow, cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a Hugging Face directory of a tiny random model per architecture (built once)."""
    built: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(tmp_path_factory.mktemp(f"hf-{arch}"), arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs):
    """Factory: a bundle of a tiny model per (architecture, precision), built once per session."""
    from quantize import build_bundle

    built: dict[tuple[str, str], Path] = {}

    def get(arch: str = "llama", precision: str = "fp32") -> Path:
        key = (arch, precision)
        if key not in built:
            out = tmp_path_factory.mktemp(f"bundle-{arch}-{precision}") / "bundle"
            build_bundle(tiny_model_dirs(arch), out, precision=precision, name=f"tiny-{arch}", max_ppl_ratio=10.0)
            built[key] = out
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundles) -> Path:
    """A tiny random llama bundle (fp32): the quickest real bundle for engine, bridge and daemon tests."""
    return tiny_bundles("llama", "fp32")


def _cached_real_bundle(precision: str) -> Path:
    """The default edge model's bundle in the user's cache, built once (fetch + quantize) and reused."""
    from edge_runtime.bundle import verify_bundle
    from edge_runtime.errors import BundleError
    from edge_runtime.models import default_bundle_dir
    from quantize import build_bundle

    out = default_bundle_dir("smollm2-135m-instruct", precision)
    try:
        verify_bundle(out, "fast")
        return out
    except BundleError:
        pass
    build_bundle("smollm2-135m-instruct", out, precision=precision, force=True)
    return out


@pytest.fixture(scope="session")
def smollm2_int4() -> Path:
    return _cached_real_bundle("int4")


@pytest.fixture(scope="session")
def smollm2_fp32() -> Path:
    return _cached_real_bundle("fp32")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from edge_runtime.models import fetch_model

    return fetch_model("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch):
    """Tests must not pick up a developer's EDGE_RUNTIME_* settings (the cache location excepted)."""
    for key in list(os.environ):
        if key.startswith("EDGE_RUNTIME_") and key != "EDGE_RUNTIME_CACHE":
            monkeypatch.delenv(key, raising=False)
