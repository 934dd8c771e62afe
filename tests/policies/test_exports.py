"""Public names: everything in __all__ exists, and the private modules' public names are re-exported."""

import importlib

import pytest

PACKAGES = {
    "edge_runtime.policies": ["_base", "_budget", "_chain", "_early_exit", "_pre_route", "_privacy", "_registry",
                              "_replay", "_simple"],
    "edge_runtime.tasks": ["_scoring", "_types"],
}

# shared between private modules of the package, not part of its API
INTERNAL = {"budget_exhausted", "check_answers"}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_exported_names(package):
    pkg = importlib.import_module(package)
    assert all(hasattr(pkg, name) for name in pkg.__all__)
    for mod_name in PACKAGES[package]:
        mod = importlib.import_module(f"{package}.{mod_name}")
        missing = [n for n in mod.__all__ if n not in pkg.__all__ and n not in INTERNAL]
        assert not missing, (mod_name, missing)


def test_metrics_exports():
    metrics = importlib.import_module("edge_runtime.metrics")
    assert all(callable(getattr(metrics, n)) or isinstance(getattr(metrics, n), type) for n in metrics.__all__)
