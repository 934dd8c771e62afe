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


def test_a_replace_flushes_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    import edge_runtime._files as files

    events: list[tuple[str, str]] = []
    real_fsync, real_open, real_replace = os.fsync, os.open, os.replace
    names: dict[int, str] = {}

    def opened(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = Path(path).name
        return fd

    monkeypatch.setattr(files.os, "open", opened)
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", names[fd])), real_fsync(fd))[1])
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    staging = tmp_path / "out" / ".bundle.tmp"
    (staging / "sub").mkdir(parents=True)
    (staging / "model.onnx.data").write_bytes(b"w" * 10)
    (staging / "sub" / "x").write_bytes(b"x")
    files.durable_replace(staging, tmp_path / "out" / "bundle")
    # every file and the directory itself reach the disk before the new name points at them, the name after
    assert events == [("fsync", "model.onnx.data"), ("fsync", "sub"), ("fsync", "x"), ("fsync", ".bundle.tmp"),
                      ("replace", "bundle"), ("fsync", "out")]
    assert (tmp_path / "out" / "bundle" / "sub" / "x").read_bytes() == b"x"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_file_written_whole_has_the_mode_a_plain_write_gets(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text_whole(tmp_path / "report.md", "x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_threads_writing_one_file_leave_one_whole_version_and_no_temporary_file(tmp_path):
    import threading

    texts = [f"{i}\n" * 10000 for i in range(8)]
    threads = [threading.Thread(target=write_text_whole, args=(tmp_path / "points.csv", t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "points.csv").read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["points.csv"]
