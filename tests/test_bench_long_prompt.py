"""The long-prompt memory benchmark's own code path on the tiny bundle (fresh processes, results file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def long_prompt(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.long_prompt as module

    return module


def test_each_length_runs_in_its_own_process_and_the_cache_is_given_back(long_prompt, tiny_bundle: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "long-prompt-test.json"
    assert long_prompt.main(["--bundle", str(tiny_bundle), "--tokens", "20", "200", "--threads", "1",
                             "--cache-tokens", "32", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["prompt_tokens"] for r in doc["runs"]] == [20, 200]
    for run in doc["runs"]:
        rss = run["rss_mib"]
        assert 0 < rss["after_load"] <= rss["peak"] and rss["after_long"] > 0 and rss["after_short"] > 0
        assert run["kv_capacity_after"] == 32 and run["completion_tokens"] == 4 and run["kv_bytes_per_token"] > 0


@pytest.mark.parametrize("flags", [["--tokens", "0"], ["--tokens", "-5"], ["--cache-tokens", "-5"], ["--out", "DIR"],
                                   ["--bundle", "NOT_A_BUNDLE"]])
def test_bad_flags_are_refused_before_any_measuring(long_prompt, tiny_bundle: Path, tmp_path: Path, capsys,
                                                   flags: list[str]) -> None:
    # each failed in the measuring child with a traceback (-5 sliced the sample from its end), or, for a directory
    # as --out, only after every length was measured
    flags = [str(tmp_path) if f == "DIR" else str(tmp_path / "nope") if f == "NOT_A_BUNDLE" else f for f in flags]
    base = [] if "--bundle" in flags else ["--bundle", str(tiny_bundle)]
    with pytest.raises(SystemExit) as exit_:
        long_prompt.main([*base, "--tokens", "20", *flags] if "--tokens" not in flags else [*base, *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert "error: argument" in err or "error: --bundle:" in err, err
