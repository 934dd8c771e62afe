"""Writes that fail name their file, and a file written whole is the old one or the new one, never half."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edge_runtime._files import naming, write_text_whole


def test_a_failed_write_names_its_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old\n")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write to a full card raises: no file name

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as info:
        write_text_whole(path, "new\n")
    assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    write_text_whole(path, "new\r\n")
    assert path.read_bytes() == b"new\r\n"  # written as given (the CSV's own line ends)


def test_an_error_that_names_its_own_file_keeps_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info, naming(tmp_path / "other"):
        open(tmp_path / "missing" / "x")
    assert info.value.filename == str(tmp_path / "missing" / "x")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_run_record_that_cannot_be_written_names_the_run_file(tmp_path):
    from edge_runtime.engine.types import SamplingParams
    from edge_runtime.runs import RunCache

    cache = RunCache("edge", "model", SamplingParams(), root=tmp_path)
    cache.path = Path("/dev/full")  # every write: "No space left on device", as on a full SD card
    with pytest.raises(OSError) as info:
        cache.add({"item_id": "a", "text": "x" * 10000})
    assert info.value.filename == "/dev/full"
