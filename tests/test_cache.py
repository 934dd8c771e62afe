"""The cache directory: EDGE_RUNTIME_CACHE values that cannot be a directory are one-line errors naming it."""

from __future__ import annotations

import pytest

from edge_runtime.cache import cache_dir
from edge_runtime.errors import ConfigError


@pytest.mark.parametrize("value", ["~nosuchuser-edge-runtime/cache", "/dev/null/cache"])
def test_a_cache_that_cannot_be_a_directory_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", value)
    with pytest.raises(ConfigError) as info:
        cache_dir("bundles")
    assert info.value.field == "EDGE_RUNTIME_CACHE"
