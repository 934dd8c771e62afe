"""`edge-runtime generate`: --prompt, --chat, --json fields, --input batches in order with per-line errors,
execution providers and their options (flags, and the settings the daemon reads)."""

from __future__ import annotations

import json

import pytest

from edge_runtime.cli import main


def test_json_output_has_the_documented_fields(tiny_bundle, capsys):
    assert main(["generate", str(tiny_bundle), "--prompt", "hello world", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "finish_reason", "tokens", "usage", "timings", "energy"}
    assert out["finish_reason"] == "length" and len(out["tokens"]) == 6
    assert set(out["tokens"][0]) == {"id", "text", "logprob", "entropy", "margin", "bytes"}
    # a token holding part of a character reads "\ufffd": its bytes, as OpenAI gives them, rebuild the text
    assert out["text_tokens"] == 6
    assert bytes(b for t in out["tokens"] for b in t["bytes"]).decode("utf-8", "replace") == out["text"]
    assert out["usage"]["completion_tokens"] == 6 and out["usage"]["prompt_tokens"] > 0
    assert set(out["timings"]) >= {"load_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s"}
    assert out["energy"]["source"] and isinstance(out["energy"]["estimated"], bool)
    assert 0.0 <= out["confidence"]["p_correct"] <= 1.0 and out["confidence"]["estimator"] == "generic"


def test_the_tokens_that_made_the_text_are_counted_and_their_bytes_rebuild_it(smollm2_int4, capsys):
    def run(chat: str, *flags: str) -> dict:
        assert main(["generate", str(smollm2_int4), "--chat", chat, "--max-new-tokens", "40", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    def rebuilt(out: dict) -> str:
        return bytes(b for t in out["tokens"][:out["text_tokens"]] for b in t["bytes"]).decode("utf-8", "replace")

    japanese = run("Say hello in Japanese.")  # its tokens hold parts of characters: each reads "\ufffd"
    assert "\ufffd" in [t["text"] for t in japanese["tokens"]] and rebuilt(japanese) == japanese["text"]
    # an eos or a cut stop string's tokens follow the text's: their bytes are not the text's
    english = run("What is the capital of France? Answer in one sentence.")
    assert rebuilt(english) == english["text"]
    if english["finish_reason"] == "eos":
        assert english["text_tokens"] == len(english["tokens"]) - 1
    stop = next(t["text"] for t in english["tokens"][2:] if t["text"].strip().isascii() and t["text"].strip().isalpha())
    cut = run("What is the capital of France? Answer in one sentence.", "--stop", stop)
    assert cut["finish_reason"] == "stop" and stop not in cut["text"] and len(cut["tokens"]) > cut["text_tokens"]
    assert rebuilt(cut) == cut["text"]  # a whole token was the stop string
    # a stop string starting inside a token: that token made the text's end and holds the stop's start
    inside = stop.strip()[:3]
    cut = run("What is the capital of France? Answer in one sentence.", "--stop", inside)
    assert cut["finish_reason"] == "stop" and inside not in cut["text"]
    assert rebuilt(cut).startswith(cut["text"]) and inside.startswith(rebuilt(cut)[len(cut["text"]):])


def test_a_chat_too_long_for_the_window_is_fitted_with_truncate_prompt(tiny_bundle, capsys):
    # the error said "set truncate_prompt", and --prompt/--chat had no way to
    chat = "beginning " + "word " * 300 + "the end"
    assert main(["generate", str(tiny_bundle), "--chat", chat, "--max-new-tokens", "4", "--json"]) == 1
    err = capsys.readouterr().err  # the advice in the flags' words
    assert "--chat:" in err and "--truncate-prompt" in err and "--max-new-tokens" in err and "truncate_prompt" not in err
    assert main(["generate", str(tiny_bundle), "--chat", chat, "--max-new-tokens", "4", "--json", "--truncate-prompt"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usage"]["prompt_tokens"] + 4 == 256 and out["usage"]["completion_tokens"] == 4


def test_chat_and_prompt_differ_by_the_template(tiny_bundle, capsys):
    main(["generate", str(tiny_bundle), "--prompt", "hello", "--max-new-tokens", "3", "--json"])
    raw = json.loads(capsys.readouterr().out)
    main(["generate", str(tiny_bundle), "--chat", "hello", "--max-new-tokens", "3", "--json"])
    chat = json.loads(capsys.readouterr().out)
    assert chat["usage"]["prompt_tokens"] > raw["usage"]["prompt_tokens"] + 4


def test_streamed_text_output(tiny_bundle, capsys):
    assert main(["generate", str(tiny_bundle), "--prompt", "hello world", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_input_file_is_answered_in_order_with_errors_in_place(tiny_bundle, tmp_path, capsys):
    lines = [
        {"id": "a", "prompt": "hello world"},
        "this is not json",
        {"id": "c", "messages": [{"role": "robot", "content": "x"}]},
        {"id": "d", "messages": [{"role": "user", "content": "one two"}], "max_new_tokens": 2},
        {"id": "e", "prompt": "hi", "temperature": -1},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code = main(["generate", str(tiny_bundle), "--input", str(path), "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    out = [json.loads(x) for x in captured.out.splitlines()]
    # the exit status alone would read like a command that stopped: stderr says every line was written
    assert "3 of 5 input lines failed" in captured.err
    assert [o["id"] for o in out] == ["a", 2, "c", "d", "e"]
    assert out[0]["finish_reason"] == "length" and len(out[0]["tokens"]) == 4
    assert out[1]["error"]["param"] == "line"
    assert out[2]["error"]["param"] == "messages[0].role"
    assert len(out[3]["tokens"]) == 2
    assert out[4]["error"]["param"] == "temperature"
    assert code == 1  # some lines failed


def test_input_lines_that_are_not_utf8_or_carry_odd_values_fail_alone(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([  # a BOM, as a Windows editor saves it
        json.dumps({"id": "a", "prompt": "hello world"}).encode(),
        b'{"id": "b", "prompt": "bad \xff\xfe bytes"}',
        json.dumps({"id": "c", "prompt": "hi", "seed": -1, "temperature": 0.7}).encode(),
        json.dumps({"id": "d", "prompt": "hi", "max_tokens": 3}).encode(),  # a typo is not silently ignored
        json.dumps({"id": None, "prompt": "hi", "top_p": None}).encode(),  # null: the default
    ]) + b"\n")
    code = main(["generate", str(tiny_bundle), "--input", str(path), "--max-new-tokens", "2", "--json"])
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["id"] for o in out] == ["a", 2, "c", "d", None]
    assert "error" not in out[0] and "error" not in out[4]
    assert [o["error"]["param"] for o in out[1:4]] == ["line", "seed", "max_tokens"]
    assert "not valid UTF-8" in out[1]["error"]["message"] and out[1]["line"] == 2
    assert code == 1


def test_unreadable_input_file_is_reported_before_loading_the_model(tiny_bundle, tmp_path, capsys, monkeypatch):
    import edge_runtime.engine

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(edge_runtime.engine, "Engine", no_load)
    for path in (tmp_path / "missing.jsonl", tmp_path):
        assert main(["generate", str(tiny_bundle), "--input", str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--input" in err and "cannot read" in err, err


def test_missing_bundle_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def _capture_providers(monkeypatch):
    """Record the provider list each onnxruntime session is created with."""
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None, **kwargs):
        seen.append(providers)
        return real(path, sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def test_provider_and_its_options_reach_onnxruntime(tiny_bundle, capsys, monkeypatch):
    seen = _capture_providers(monkeypatch)
    assert main(["generate", str(tiny_bundle), "--prompt", "hello", "--max-new-tokens", "2", "--json",
                 "--provider", "CPUExecutionProvider",
                 "--provider-option", "CPUExecutionProvider:arena_extend_strategy=kSameAsRequested"]) == 0
    assert json.loads(capsys.readouterr().out)["finish_reason"] == "length"
    assert seen == [[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]]
    # options alone are for the default provider
    assert main(["generate", str(tiny_bundle), "--prompt", "hello", "--max-new-tokens", "2", "--json",
                 "--provider-option", "CPUExecutionProvider:arena_extend_strategy=kSameAsRequested"]) == 0
    assert seen[-1] == [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]


def test_bad_provider_flags_are_one_line_errors_naming_the_flag(tiny_bundle, capsys):
    for extra, expected in (
        (["--provider-option", "CPUExecutionProvider"], "--provider-option: expected NAME:KEY=VALUE"),
        (["--provider", "CPUExecutionProvider", "--provider-option", "XnnpackExecutionProvider:a=1"], "not in the provider list"),
        (["--provider", "NoSuchExecutionProvider"], "--provider: execution provider(s) NoSuchExecutionProvider not available"),
    ):
        assert main(["generate", str(tiny_bundle), "--prompt", "x", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize(("flags", "named"), [
    (["--prompt", "x", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature: "),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: "),
    (["--prompt", "x", "--top-logprobs", "21", "--json"], "--top-logprobs: "),
    (["--prompt", "x", "--stop", "a", "--stop", ""], "--stop[1]: "),
    (["--prompt", "x", "--threads", "0"], "--threads: "),
    (["--prompt", "x", "--prompt-lookup", "9"], "--prompt-lookup: "),
    (["--prompt", ""], "--prompt: must not be empty"),
])
def test_a_bad_flag_value_names_the_flag_not_the_apis_field(tiny_bundle, capsys, flags, named):
    # it said "top_p: must be in (0, 1]", a name the command line does not have
    assert main(["generate", str(tiny_bundle), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {named}" in err, err


def test_flags_only_json_output_shows_are_refused_with_streamed_text(tiny_bundle, tmp_path, capsys):
    for extra in (["--top-logprobs", "2"], ["--estimator", str(tmp_path / "e.json")]):
        assert main(["generate", str(tiny_bundle), "--prompt", "x", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{extra[0]}: is shown only in JSON output" in err, err
    assert main(["generate", str(tiny_bundle), "--prompt", "x", "--max-new-tokens", "2", "--top-logprobs", "2",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]["top_logprobs"]) == 2


def test_settings_give_provider_options_to_the_engine(tiny_bundle, monkeypatch):
    from edge_runtime.errors import ConfigError
    from edge_runtime.hybrid import HybridRuntime
    from edge_runtime.settings import load_runtime_settings

    seen = _capture_providers(monkeypatch)
    engine = {"bundle": str(tiny_bundle), "providers": ["CPUExecutionProvider"],
              "provider_options": {"CPUExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}}}
    runtime = HybridRuntime.from_settings(load_runtime_settings(data={"engine": engine}, env={}))
    runtime.close()
    assert seen == [[("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]]
    # options alone are for the default provider
    assert main(["generate", str(tiny_bundle), "--prompt", "hello", "--max-new-tokens", "2", "--json",
                 "--provider-option", "CPUExecutionProvider:arena_extend_strategy=kSameAsRequested"]) == 0
    assert seen[-1] == [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    engine["provider_options"] = {"XnnpackExecutionProvider": {"intra_op_num_threads": 2}}
    with pytest.raises(ConfigError) as info:
        load_runtime_settings(data={"engine": engine}, env={})
    assert info.value.field == "engine.provider_options.XnnpackExecutionProvider"


def test_input_lines_python_cannot_decode_or_print_as_is_fail_alone(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join([
        b'{"id": "big", "prompt": "hi", "seed": ' + b"1" * 5000 + b"}",  # past Python's int-parsing limit
        b"[" * 100_000,  # deeper than json's recursion
        json.dumps({"id": "j\ud800", "prompt": "hello world"}).encode(),  # half a character in the id
        b'{"id": "tab", "prompt": "a\tb"}',  # a raw control character: not JSON
        json.dumps({"id": "k", "prompt": "hi", "\ud800k": 1}).encode(),  # ... or in an unknown key
        json.dumps({"id": "last", "prompt": "hello world"}).encode(),
    ]) + b"\n")
    code = main(["generate", str(tiny_bundle), "--input", str(path), "--max-new-tokens", "2", "--json"])
    lines = capsys.readouterr().out.splitlines()
    for line in lines:
        assert "\\ud800" not in line  # never echoed: strict JSON readers (serde_json) refuse half a character
        line.encode("utf-8")
    out = [json.loads(x) for x in lines]
    # refused as content with it is (QA OO), reported under its line number
    assert [o["id"] for o in out] == [1, 2, 3, 4, "k", "last"]
    assert [o["error"]["param"] for o in out[:5]] == ["line", "line", "id", "line", "\ufffdk"]
    assert "not valid UTF-8" in out[2]["error"]["message"]
    # the position is not cut off the message (json's own ends in "at")
    assert out[3]["error"]["message"].endswith("is not valid JSON: Invalid control character at column 27")
    assert "error" not in out[5] and code == 1


def test_input_numbers_that_are_not_json_fail_alone_and_every_output_line_is_json(tiny_bundle, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        '{"id": 1e400, "prompt": "hi"}',  # valid JSON, but no double holds it: it would be echoed back as Infinity
        '{"id": "n", "prompt": "hi", "temperature": NaN}',  # Python's json reads NaN unless told not to
        '{"id": "i", "prompt": "hi", "top_p": -Infinity}',
        '{"id": 2.5, "prompt": "hi"}',
    ]) + "\n")
    code = main(["generate", str(tiny_bundle), "--input", str(path), "--max-new-tokens", "2", "--json"])
    lines = capsys.readouterr().out.splitlines()
    out = [json.loads(x, parse_constant=lambda name: pytest.fail(f"{name} in the output")) for x in lines]
    assert [o["id"] for o in out] == [1, 2, 3, 2.5]
    assert [o["error"]["param"] for o in out[:3]] == ["line", "line", "line"]
    assert "outside a double's range" in out[0]["error"]["message"] and "NaN is not JSON" in out[1]["error"]["message"]
    assert "error" not in out[3] and code == 1


def test_input_dash_reads_standard_input(tiny_bundle, capsys, monkeypatch):
    import io
    import sys

    lines = [{"id": "a", "prompt": "hello world"}, {"id": "b", "messages": [{"role": "user", "content": "hi"}]}]
    stdin = io.TextIOWrapper(io.BytesIO(("\n".join(json.dumps(x) for x in lines) + "\n").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["generate", str(tiny_bundle), "--input", "-", "--max-new-tokens", "2", "--json"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == ["a", "b"]


def test_running_out_of_memory_is_one_line_not_a_traceback(tiny_bundle, capsys, monkeypatch):
    import edge_runtime.engine as engine_package
    from edge_runtime.errors import OutOfMemoryError

    def failing(message):
        def engine(*args, **kwargs):
            raise message
        return engine

    # ours (the engine translated it), and a MemoryError from anywhere else
    for err, said in ((OutOfMemoryError(f"not enough memory to load {tiny_bundle}"), "not enough memory to load"),
                      (MemoryError(), "error: out of memory")):
        monkeypatch.setattr(engine_package, "Engine", failing(err))
        assert main(["generate", str(tiny_bundle), "--prompt", "hello"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edge-runtime generate: error: ") and said in lines[0]


def test_closed_standard_streams_are_errors_before_the_model_loads(tiny_bundle, capsys, monkeypatch):
    import sys

    import edge_runtime.engine as engine_pkg

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine_pkg, "Engine", no_load)
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", None)  # `>&-`: Python's print() would drop the answer silently
        assert main(["generate", str(tiny_bundle), "--prompt", "hi", "--json"]) == 1
    assert "stdout: standard output is closed" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr(sys, "stdin", None)
        assert main(["generate", str(tiny_bundle), "--input", "-"]) == 1
    assert "--input: standard input is closed" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", None)  # `2>&-`: the error line must not land in the results on stdout
        assert main(["generate", str(tiny_bundle.parent / "no-such-bundle"), "--prompt", "hi"]) == 1
    assert capsys.readouterr().out == ""


def test_an_output_encoding_that_is_not_utf8_gets_escapes_not_a_traceback(tiny_bundle, monkeypatch):
    import io
    import sys

    from edge_runtime.cli import generate as generate_cli

    from edge_runtime.config import run_command

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))  # PYTHONIOENCODING=ascii

    def emit(_args):
        line = generate_cli._json_line({"text": "café 東京"})
        sys.stdout.write(line + "\n" + "café\n")  # the JSON line, then streamed text
        sys.stdout.write("— →\n")  # every command's output: eval's table and calibrate's summary were tracebacks
        sys.stdout.flush()

    # at the CLIs' one boundary, for every command
    assert run_command("edge-runtime", generate_cli.argparse.Namespace(func=emit, command="eval", verbose=0)) == 0
    json_line, text, table = raw.getvalue().decode("ascii").splitlines()
    assert json.loads(json_line) == {"text": "café 東京"}
    assert text == "caf\\xe9" and table == "\\u2014 \\u2192"


def test_json_output_warns_when_its_p_correct_comes_from_an_estimator_fitted_on_another_model(tiny_bundle, capsys,
                                                                                               caplog):
    # the daemon and HybridRuntime said so; generate printed the built-in (SmolLM2) estimator's p_correct silently
    import logging

    caplog.set_level(logging.WARNING)
    assert main(["generate", str(tiny_bundle), "--prompt", "hi", "--max-new-tokens", "2", "--json"]) == 0
    assert "fitted on smollm2-135m-instruct, not " in caplog.text
    caplog.clear()
    assert main(["generate", str(tiny_bundle), "--prompt", "hi", "--max-new-tokens", "2"]) == 0  # no p_correct shown
    assert "fitted on" not in caplog.text
