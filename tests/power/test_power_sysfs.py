"""The one read helper: missing files, garbage, bad bytes, permission errors, NUL-terminated strings."""

from __future__ import annotations

from pathlib import Path

import pytest
from power_fakes import call_unprivileged, make_unreadable, write

from edge_runtime.power._sysfs import PERMISSION_DENIED, cat, read_int, try_read_int, under_root


def test_cat_strips_whitespace_and_trailing_nul(tmp_path: Path) -> None:
    (tmp_path / "model").write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    write(tmp_path / "name", "package-0")
    assert cat(tmp_path / "model") == "Raspberry Pi 5 Model B Rev 1.0"
    assert cat(tmp_path / "name") == "package-0"


def test_missing_file_raises_without_fallback_and_returns_it_with_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cat(tmp_path / "nope")
    assert cat(tmp_path / "nope", fallback="x") == "x"
    assert read_int(tmp_path / "nope", fallback=-1) == -1
    assert try_read_int(tmp_path / "nope") == (None, "missing")


def test_garbage_and_undecodable_bytes_are_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "energy_uj").write_bytes(b"\xff\xfe12\n")
    value, problem = try_read_int(tmp_path / "energy_uj")
    assert value is None and problem is not None and "garbage" in problem
    write(tmp_path / "power1_input", "not a number")
    with pytest.raises(ValueError, match="garbage"):
        read_int(tmp_path / "power1_input")
    assert read_int(tmp_path / "power1_input", fallback=0) == 0
    write(tmp_path / "ok", " 123456789012 ")
    assert try_read_int(tmp_path / "ok") == (123456789012, None)


def test_permission_denied_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "energy_uj", 5)
    make_unreadable(path)
    value, problem = call_unprivileged(try_read_int, path)
    assert value is None and problem == PERMISSION_DENIED


def test_under_root_joins_absolute_paths(tmp_path: Path) -> None:
    assert under_root(tmp_path, "/sys/class/powercap") == tmp_path / "sys/class/powercap"
    assert under_root("/", "/sys/class/hwmon") == Path("/sys/class/hwmon")
