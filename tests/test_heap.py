"""Giving freed heap memory back (edge_runtime._heap) and the long encodes that do it."""

from __future__ import annotations

import sys

from edge_runtime import _heap
from edge_runtime.engine import Engine
from edge_runtime.engine import engine as engine_module


def test_release_free_heap_trims_on_glibc_and_is_a_no_op_elsewhere(monkeypatch):
    if sys.platform.startswith("linux"):
        assert _heap._malloc_trim() is not None  # glibc (musl has no malloc_trim: then None, as on macOS)
    _heap.release_free_heap()
    monkeypatch.setattr(_heap, "_malloc_trim", lambda: None)
    _heap.release_free_heap()


def test_a_long_encode_gives_its_freed_memory_back(tiny_bundle, monkeypatch):
    # a 900 kB prompt's encoding took a process from 71 to 212 MiB, kept after it was freed; trimmed: 82
    calls = []
    monkeypatch.setattr(engine_module, "release_free_heap", lambda: calls.append(1))
    with Engine(tiny_bundle, energy_meter=None) as engine:
        engine.encode("hello world " * 1_000)
        assert calls == []  # short texts: not worth the call
        ids = engine.encode("hello world " * 10_000)
        assert calls == [1] and ids == engine.encode("hello world " * 10_000)
