"""A bundle is a directory someone handed over: a damaged or hostile manifest fails verification, never hangs or crashes."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edge_runtime.bundle import load_manifest, verify_bundle
from edge_runtime.cli import main
from edge_runtime.errors import BundleError, BundleVerificationError


@pytest.fixture()
def bundle(tiny_bundles, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(tiny_bundles("llama", "fp32"), path)
    return path


def _edit(bundle, edit):
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [True, 1.0])
def test_a_schema_version_that_only_python_reads_as_1_is_refused(bundle, version):
    _edit(bundle, lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError, match="schema_version"):
        load_manifest(bundle)


@pytest.mark.parametrize("edit", [
    lambda m: m["files"].update({"a\x00b": {"size": 0, "sha256": "0" * 64}}),
    lambda m: m["files"].update({".": {"size": 0, "sha256": "0" * 64}}),
    lambda m: m.update(model_file="."),
    lambda m: m.update(model_file=""),
])
def test_file_names_that_are_not_files_in_the_bundle_name_the_field(bundle, capsys, edit):
    _edit(bundle, edit)
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(bundle, "fast")
    assert info.value.file == "manifest.json" and "field" in str(info.value)
    assert main(["models", "verify", str(bundle)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_manifest_nested_past_pythons_stack_is_invalid_json_not_a_crash(bundle, capsys):
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleVerificationError, match="not valid JSON: nested too deeply"):
        load_manifest(bundle)
    assert main(["models", "verify", str(bundle)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_stamp_nested_past_pythons_stack_only_means_hashing_again(bundle):
    (bundle / "stamp.json").write_text("[" * 100_000 + "]" * 100_000)
    assert verify_bundle(bundle, "fast").name


def test_refreshing_the_stamp_never_writes_through_a_link_planted_in_the_bundle(bundle, tmp_path, monkeypatch):
    # its temporary file had the pid's name and was written through: anyone who can write in a shared bundle could
    # plant a link there and have verification overwrite the file it pointed at
    monkeypatch.setattr("edge_runtime.bundle._FAST_SKIP_MIN_BYTES", 0)  # the tiny model's files are stamped too
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    planted = bundle / f".stamp.json.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    for name in load_manifest(bundle).files:  # copied: new mtimes
        st = (bundle / name).stat()
        os.utime(bundle / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert verify_bundle(bundle, "fast").name
    assert victim.read_text() == "precious\n"
    assert not (bundle / "stamp.json").is_symlink() and json.loads((bundle / "stamp.json").read_text())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_listed_files_that_are_fifos_or_devices_are_refused_not_read_forever(bundle):
    fifo = bundle / "fifo"
    os.mkfifo(fifo)
    _edit(bundle, lambda m: m["files"].update(fifo={"size": 0, "sha256": "0" * 64}))
    with pytest.raises(BundleVerificationError, match="fifo: not a regular file"):
        verify_bundle(bundle, "full")
    _edit(bundle, lambda m: m["files"].pop("fifo"))
    manifest = bundle / "manifest.json"
    text = manifest.read_text()
    (bundle / "stamp.json").unlink(missing_ok=True)
    os.mkfifo(bundle / "stamp.json")  # opened for reading, a FIFO waits for a writer: it is only "no stamp"
    assert verify_bundle(bundle, "fast").name
    manifest.unlink()
    manifest.symlink_to("/dev/zero")  # read whole, it never ends: refused before it is read
    with pytest.raises(BundleVerificationError, match="outside the bundle"):
        load_manifest(bundle)
    manifest.unlink()
    os.mkfifo(manifest)
    with pytest.raises(BundleVerificationError, match="not a regular file"):
        load_manifest(bundle)
    manifest.unlink()
    manifest.write_text(text)
    assert verify_bundle(bundle, "fast").name


def test_a_weights_file_the_graph_names_must_be_listed_whatever_its_name(bundle, capsys):
    # the check used to look only at *.data files: a graph reading "w.bin" loaded its weights unchecked
    manifest = json.loads((bundle / "manifest.json").read_text())
    data_name = next(n for n in manifest["files"] if n.endswith(".data"))
    graph = bundle / manifest.get("model_file", "model.onnx")
    old = data_name.encode()
    new = b"w.bin" + b"x" * (len(old) - 5)  # same length: the protobuf stays valid
    graph.write_bytes(graph.read_bytes().replace(old, new))
    (bundle / data_name).rename(bundle / new.decode())
    info = manifest["files"].pop(data_name)
    manifest["files"][new.decode()] = info
    manifest["files"][graph.name]["sha256"] = __import__("hashlib").sha256(graph.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    verify_bundle(bundle, "full")  # listed under its own name: fine
    manifest["files"].pop(new.decode())
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleVerificationError, match=f"must list {new.decode()}"):
        verify_bundle(bundle, "none")
    assert main(["generate", str(bundle), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    assert f"must list {new.decode()}" in capsys.readouterr().err


def test_a_weights_file_named_in_any_protobuf_field_order_must_be_listed(bundle):
    # QA XX: the check searched the graph's bytes for an entry written key first; one written value first (protobuf
    # allows any order, onnxruntime reads it) named an unlisted, tampered weights file that passed verification with
    # the clean bundle's hash
    import hashlib

    manifest = json.loads((bundle / "manifest.json").read_text())
    data_name = next(n for n in manifest["files"] if n.endswith(".data"))
    graph = bundle / manifest.get("model_file", "model.onnx")
    old = data_name.encode()
    new = b"w.bin" + b"x" * (len(old) - 5)
    key_first = b"\n\x08location\x12" + bytes([len(old)]) + old
    value_first = b"\x12" + bytes([len(new)]) + new + b"\n\x08location"  # the same entry's length
    raw = graph.read_bytes()
    assert raw.count(key_first) >= 1
    graph.write_bytes(raw.replace(key_first, value_first))
    (bundle / new.decode()).write_bytes((bundle / data_name).read_bytes())
    manifest["files"][graph.name]["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleVerificationError, match=f"must list {new.decode()}"):
        verify_bundle(bundle, "none")
    # a graph file that is not protobuf at all is refused naming it, not a traceback
    graph.write_bytes(b"\x0b" * graph.stat().st_size)  # the listed size: only sizes are checked here
    with pytest.raises(BundleVerificationError, match="not an ONNX graph"):
        verify_bundle(bundle, "none")


def test_the_bundle_hash_covers_what_the_manifest_changes_in_the_answers(bundle):
    """A bundle whose chat template or tokens changed is another bundle to the run cache, the bridge's revision and
    estimator files (QA QQ: an edited template was answered from the old one's cached runs); when and with which
    tools it was built is not."""
    before = load_manifest(bundle)
    for edit in (lambda m: m.update(chat_template=(m.get("chat_template") or "") + " "),
                 lambda m: m["tokens"].update(eos_token_ids=[0]),
                 lambda m: m["tokens"].update(add_bos_token=not m["tokens"].get("add_bos_token"))):
        _edit(bundle, edit)
        edited = load_manifest(bundle)
        assert edited.bundle_hash != before.bundle_hash
        assert edited.legacy_bundle_hash == before.legacy_bundle_hash  # the files did not change
        (bundle / "manifest.json").write_text(json.dumps(before.raw))
    # ... and neither do its name or its source's file (review 22: a build from a renamed copy of the same GGUF
    # refused the estimator of the first)
    _edit(bundle, lambda m: m.update(created_at="2030-01-01T00:00:00+00:00", tools={"onnx": "9"},
                                     quality={**m.get("quality", {}), "ppl_bundle": 1.0}, name="renamed",
                                     quantization={**m["quantization"], "method": "reworded"},
                                     source={**m.get("source", {}), "file": "copy.gguf"}))
    assert load_manifest(bundle).bundle_hash == before.bundle_hash
    # key order and whitespace are the file's, not the content's
    (bundle / "manifest.json").write_text(json.dumps(dict(reversed(list(before.raw.items()))), indent=3))
    assert load_manifest(bundle).bundle_hash == before.bundle_hash
    # a setting added to the manifest later is no other bundle while unset: a default int4 build gained
    # "int4_symmetric": false, and every rebuilt bundle lost its estimators and cached runs
    earlier = {k: v for k, v in before.raw["quantization"].items() if k != "int4_symmetric"}  # as built before it
    for quantization, same in ((earlier, True), ({**earlier, "int4_symmetric": False}, True),
                               ({**earlier, "int4_symmetric": None}, True), ({**earlier, "int4_symmetric": True}, False)):
        _edit(bundle, lambda m: m.update(quantization=quantization))
        assert (load_manifest(bundle).bundle_hash == before.bundle_hash) is same
    (bundle / "manifest.json").write_text(json.dumps(before.raw))


@pytest.mark.parametrize("extra", [1, None])
def test_a_tokenizer_that_is_not_the_models_is_refused_at_load(bundle, extra):
    # QA XX: another model's tokenizer (the manifest's hash re-made) passed verification, and its ids past the
    # vocabulary gave silent garbage; an empty vocabulary ended the first request in an AssertionError
    import hashlib

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from edge_runtime.engine import Engine

    vocab_size = json.loads((bundle / "manifest.json").read_text())["model"]["vocab_size"]
    words = {} if extra is None else {f"w{i}": i for i in range(vocab_size + extra)}
    Tokenizer(WordLevel(words or {"[UNK]": 0}, unk_token="[UNK]")).save(str(bundle / "tokenizer.json"))
    if extra is None:  # no tokens at all
        data = json.loads((bundle / "tokenizer.json").read_text())
        data["model"]["vocab"] = {}
        (bundle / "tokenizer.json").write_text(json.dumps(data))
    raw = (bundle / "tokenizer.json").read_bytes()
    _edit(bundle, lambda m: m["files"]["tokenizer.json"].update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    with pytest.raises(BundleError, match="not this model's tokenizer") as info:
        Engine(bundle)
    assert ("no tokens" if extra is None else f"{vocab_size + 1} tokens") in str(info.value)


def test_a_listed_file_linked_from_outside_the_bundle_is_refused(bundle, tmp_path):
    # QA XX: verification said OK, then onnxruntime refused the weights; a linked tokenizer was read from outside
    outside = tmp_path / "outside"
    outside.mkdir()
    (bundle / "tokenizer.json").rename(outside / "tokenizer.json")
    (bundle / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(BundleVerificationError, match="tokenizer.json: a symbolic link to a file outside the bundle"):
        verify_bundle(bundle, "none")
    # a link inside the bundle, or the bundle directory itself a link, is fine
    (bundle / "tokenizer.json").unlink()
    (outside / "tokenizer.json").rename(bundle / "tok.json")
    (bundle / "tokenizer.json").symlink_to("tok.json")
    linked = tmp_path / "linked"
    linked.symlink_to(bundle)
    assert verify_bundle(linked, "full").name
    # the manifest too: it holds the template, the tokens and every file's hash, and was read from anywhere
    (linked / "manifest.json").rename(outside / "manifest.json")
    (bundle / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(BundleVerificationError, match="manifest.json: a symbolic link to a file outside the bundle"):
        verify_bundle(linked, "none")
    (bundle / "manifest.json").unlink()
    (outside / "manifest.json").rename(bundle / "manifest.json")
    # a link loop is the one-line error it was, not a RuntimeError traceback (review 30)
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to("tokenizer.json")
    with pytest.raises(BundleVerificationError, match="tokenizer.json: cannot read it"):
        verify_bundle(bundle, "none")


def test_a_tokenizer_id_past_the_models_vocabulary_is_refused_when_it_is_met(bundle):
    # review 30: a tokenizer of few tokens, one with an id past the vocabulary, passed the count at load and answered
    # garbage (finding the largest id at load costs 50-190 ms, so it is checked where ids are made)
    import hashlib

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from edge_runtime.engine import Engine

    vocab_size = json.loads((bundle / "manifest.json").read_text())["model"]["vocab_size"]
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "hi": 1, "far": vocab_size + 5}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(bundle / "tokenizer.json"))
    raw = (bundle / "tokenizer.json").read_bytes()
    _edit(bundle, lambda m: m["files"]["tokenizer.json"].update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    engine = Engine(bundle)
    assert engine.encode("hi")[-1] == 1
    with pytest.raises(BundleError, match=f"token id {vocab_size + 5}, past the model's vocabulary"):
        engine.generate("hi far", max_new_tokens=2)


def test_a_control_token_past_the_models_vocabulary_is_refused_at_load(bundle):
    # review 31: control tokens are read from the special-token table, not encoded, so the check where ids are made
    # never saw them, and such a tokenizer loaded and answered
    import hashlib

    from tokenizers import Tokenizer

    from edge_runtime.engine import Engine

    vocab_size = json.loads((bundle / "manifest.json").read_text())["model"]["vocab_size"]
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|extra|>"])
    assert tokenizer.token_to_id("<|extra|>") >= vocab_size
    tokenizer.save(str(bundle / "tokenizer.json"))
    raw = (bundle / "tokenizer.json").read_bytes()
    _edit(bundle, lambda m: m["files"]["tokenizer.json"].update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    with pytest.raises(BundleError, match="control token '<\\|extra\\|>' the id .*past the model's vocabulary"):
        Engine(bundle)



def test_a_file_given_for_a_bundle_is_named_as_a_file_not_as_missing(tmp_path):
    # QA: `models verify afile` said "bundle directory not found: afile" for a file that is there
    from edge_runtime.errors import BundleNotFoundError

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(BundleNotFoundError, match="is not a directory"):
        load_manifest(afile)
    with pytest.raises(BundleNotFoundError, match="bundle directory not found"):
        load_manifest(tmp_path / "nosuch")
