"""Writing the files a command promises: whole or not at all, durable, and an error that names the file.

A write that fails (a full SD card: ``ENOSPC``; a file-size limit: ``EFBIG``) raises an ``OSError``
without a file name, so the CLIs' error boundary printed "error: File too large" and nothing else.

A rename is atomic, not durable: after a power cut (an edge device's everyday failure) the new name can
point at a file whose data never reached the disk, empty or short. :func:`durable_replace` flushes the
data first and the directory entry after.

Directories a command writes into are checked before its work (:func:`check_can_make_dir`) and made only
when the work starts (:func:`dirs_for_work`): a command refused for bad input leaves no trace. A directory
of files that belong together (a certificate and its key) is built aside and put in place by one rename
(:func:`install_dir`): a reader finds the old set or the new one, never one file of each.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; installs there rely on the renames alone
    fcntl = None  # type: ignore[assignment]

__all__ = ["check_can_make_dir", "dirs_for_work", "durable_replace", "exclusive_lock", "install_dir", "naming",
           "remove_moved_aside", "replace_dir",
           "write_text_whole"]


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An ``OSError`` raised inside names ``path`` when it names no file itself."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = os.fspath(path)
        raise


def write_text_whole(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it: a reader finds the old file or
    the new one, never half of it; a failed write leaves the old one and no temporary file."""
    path = Path(path)
    with naming(path):
        # a name of its own per call (two threads writing one file must not write into each other's temporary
        # file), created with the mode a plain write gets: the kernel applies the umask, or a directory's default
        # ACL, itself (mkstemp's 0600 hid a report from the other users; a chmod after it overrode an ACL)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            tmp.write_text(text, encoding="utf-8", newline="")
            durable_replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def durable_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """``os.replace(src, dst)`` that survives a power cut: ``src`` (a file, or a directory and every file in it)
    is flushed to the disk first, and the directory holding ``dst`` after."""
    src = Path(src)
    _flush_tree(src)
    os.replace(src, dst)
    _fsync(Path(dst).parent)


def _flush_tree(src: Path) -> None:
    """Flush ``src`` (a file, or a directory and every file in it) to the disk."""
    if src.is_dir():
        for path in sorted(src.rglob("*")):
            _fsync(path)
    _fsync(src)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory on Windows, a special file: nothing to flush this way
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot (some network ones): the rename is still atomic
        pass
    finally:
        os.close(fd)


def check_can_make_dir(path: str | os.PathLike[str]) -> None:
    """Raise an ``OSError`` naming the directory (or the file in the way) when ``path`` could not be made, with
    its missing parents, or written in. Nothing is left behind: a command checks its output directory so while
    it validates its input, and makes the directory when its work starts."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))  # "." or "/" at the latest
    if not existing.is_dir():  # a file, or a broken symbolic link, where a directory would have to be made
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    try:  # made and removed again: access() says yes to root in /sys and to a read-only bind mount
        os.rmdir(tempfile.mkdtemp(prefix=".edge-runtime-probe-", dir=existing))
    except OSError as err:  # named as the directory, not as the probe's hidden name
        raise OSError(err.errno, err.strerror, str(existing)) from err


@contextlib.contextmanager
def dirs_for_work(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Make ``path`` and its missing parents for the work inside the block. If the block fails, the directories
    made here that are still empty are removed again: a failed download leaves no empty wheel directory."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # innermost first
    with naming(path):
        path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for directory in made:
            try:
                directory.rmdir()
            except OSError:  # not empty (the work, or someone else, put files there), or gone: keep the rest
                break
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` (made if missing, and kept) for the block; yields whether it is
    really held (False where there is no ``fcntl``). ``flock`` locks an open file, not the process: two threads of
    one process exclude each other too. The file gets the mode the umask allows, as the directory it guards does:
    an owner-only lock left by one user of a group-shared cache (an admin's failed install) refused the daemon's
    service account every later install there."""
    if fcntl is None:
        yield False
        return
    with naming(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def install_dir(target: str | os.PathLike[str], usable: Callable[[Path], bool], build: Callable[[Path], None]) -> bool:
    """Make ``target`` a directory that ``usable`` accepts, unless it is one already; return whether it was built.

    ``build`` fills a private staging directory beside ``target`` (made owner-only: ``build`` sets its mode), which
    then replaces ``target`` by one rename, so a reader finds the old files or the new ones, never some of each.
    Concurrent callers (other processes, threads) take turns under a lock beside it: the first builds, the others
    find its directory usable, and none moves away a directory another has just put there and handed out.
    """
    target = Path(target)
    if usable(target):  # no lock needed to read, nor a writable directory (a read-only cache)
        return False
    with naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(f".{target.name}.lock")) as locked:
        if usable(target):  # built by another caller while this one waited
            return False
        if locked:  # every caller builds under the lock: what another left is from a killed build
            _remove_leftovers(target)
        with naming(target):
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(staging)
            replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def replace_dir(staging: Path, target: Path, *, may_replace: Callable[[Path], None] | None = None) -> None:
    """Put ``staging`` at ``target`` durably; one already there (a directory cannot be renamed over one that holds
    files) is moved aside and removed after, or put back if anything stops the rename (a signal, an error).

    ``staging`` is flushed before the old directory moves: flushed after, a model's files on an SD card took
    seconds, in which an interrupt (a ``--force`` rebuild stopped as it finished) left neither directory at
    ``target`` and the old one aside for good. Now only the two renames separate them. ``may_replace(target)``,
    called after the flush when something is at ``target``, raises to keep it: checked before, what appeared there
    during those seconds was removed.
    """
    _flush_tree(staging)
    aside = None
    if os.path.lexists(target):
        if may_replace is not None:
            may_replace(target)
        aside = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, aside)
    try:
        os.replace(staging, target)
        _fsync(target.parent)
    except BaseException:
        if aside is not None and not os.path.lexists(target):
            os.replace(aside, target)
        raise
    if aside is not None:
        _remove(aside)


def _remove_leftovers(target: Path) -> None:
    """Staging directories and moved-aside old ones of ``target`` that a killed install left (a model's size)."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        _remove(path)
    remove_moved_aside(target)


def remove_moved_aside(target: Path) -> list[Path]:
    """Remove what :func:`replace_dir` moved aside from ``target`` and a killed process left there; return it."""
    removed = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"))
    for path in removed:
        _remove(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
