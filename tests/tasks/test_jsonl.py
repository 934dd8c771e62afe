"""User suites from JSONL files: round trip, split assignment, and errors naming line and field."""

import json

import pytest

from edge_runtime.errors import EdgeRuntimeError, TaskSuiteError
from edge_runtime.tasks import dump_suite, load_suite, score

GOOD = {"id": "q1", "family": "mine", "messages": [{"role": "user", "content": "2+2?"}], "answers": ["4"],
        "scorer": "number"}


def write(tmp_path, *rows):
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_round_trip_of_the_default_suite(tmp_path):
    items = load_suite("default", "all")
    path = tmp_path / "default.jsonl"
    assert dump_suite(items, path) == len(items)
    again = load_suite(path, "all")
    assert [i.to_dict() for i in again] == [i.to_dict() for i in items]
    assert [i.id for i in load_suite(str(path), "test")] == [i.id for i in items if i.split == "test"]


def test_minimal_items_get_a_stable_split_and_an_answer_type(tmp_path):
    rows = [dict(GOOD, id=f"q{n}") for n in range(40)]
    path = write(tmp_path, *rows, "")
    items = load_suite(path, "all")
    assert len(items) == 40
    splits = [i.split for i in items]
    assert 10 <= splits.count("dev") <= 30 and set(splits) == {"dev", "test"}
    assert [i.split for i in load_suite(path, "all")] == splits
    assert items[0].features == {"answer_type": "number"}
    assert score(items[0], "It is 4.").correct


def test_explicit_split_features_and_numeric_answers(tmp_path):
    row = dict(GOOD, split="test", features={"difficulty": 2}, answers=[4])
    items = load_suite(write(tmp_path, row), "test")
    assert items[0].answers == ("4",) and items[0].features["difficulty"] == 2
    assert load_suite(write(tmp_path, row), "dev") == []


def test_a_number_answer_keeps_the_digits_it_was_written_with(tmp_path):
    # a JSON float is a binary double: 12345678901234567890.0 read as 1.2345678901234567e+19 matched no reply
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "family": "f", "messages": [{"role": "user", "content": "Q?"}], "scorer": "number", '
                    '"answers": [12345678901234567890.0, 1.5e3], "features": {"weight": 0.5}}\n')
    item = load_suite(str(path), "all")[0]
    assert item.answers == ("12345678901234567890.0", "1.5e3") and item.features["weight"] == 0.5
    assert score(item, "12345678901234567890").correct and score(item, "1500").correct
    assert not score(item, "12345678901234567000").correct


@pytest.mark.parametrize(
    "row, line, field, message",
    [
        ("{not json", 2, None, "not valid JSON"),
        ("[1, 2]", 2, None, "expected a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "answers"}, 2, "answers", "missing"),
        (dict(GOOD, id=""), 2, "id", "non-empty string"),
        (dict(GOOD, answers=[]), 2, "answers", "non-empty list"),
        (dict(GOOD, answers=[["4"]]), 2, "answers", "non-empty list"),
        (dict(GOOD, scorer="fuzzy"), 2, "scorer", "unknown scorer 'fuzzy'"),
        (dict(GOOD, answers=["four"]), 2, "answers", "'four' is not a number"),
        (dict(GOOD, scorer="yesno", answers=["maybe"]), 2, "answers", "not yes or no"),
        (dict(GOOD, messages=[{"role": "robot", "content": "hi"}]), 2, "messages[0].role", "unknown role"),
        (dict(GOOD, messages="2+2?"), 2, "messages", "must be a list"),
        (dict(GOOD, features=[1]), 2, "features", "must be an object"),
        (dict(GOOD, split="train"), 2, "split", "'dev' or 'test'"),
        (dict(GOOD, id="q0"), 2, "id", "duplicate id 'q0' (first on line 1)"),
        # half a character (JSON's "\ud800" escape): an id failed later, writing its run record (review 23)
        (dict(GOOD, id="s\ud800"), 2, "id", "half a character"),
        (dict(GOOD, family="f\udc00"), 2, "family", "half a character"),
        (dict(GOOD, features={"k": ["\ud800"]}), 2, "features", "half a character"),
        (dict(GOOD, spilt="test"), 2, "spilt", "unknown field"),  # a typo put the item in a split by hash
        (dict(GOOD, split=False), 2, "split", "'dev' or 'test'"),
        (dict(GOOD, scorer="exact", answers=["  "]), 2, "answers", "every one is blank"),
        # found by the scoring audit
        (dict(GOOD, answers=["1,5"]), 2, "answers", "does not group thousands"),  # read as 15
        (dict(GOOD, scorer="yesno", answers=["yes", "no"]), 2, "answers", "every reply would be right"),
        (dict(GOOD, messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]), 2,
         "messages", "last message must be the user's question"),
        (dict(GOOD, messages=[{"role": "user", "content": "  "}]), 2, "messages", "last message must be the user's"),
        ('{"id": "q2", "family": "m", "messages": [{"role": "user", "content": "x"}], "answers": ["4"], '
         '"answers": ["5"], "scorer": "number"}', 2, "answers", "given twice"),
        ('{"id": "q2", "family": "m", "messages": [{"role": "user", "content": "x"}], "answers": [NaN], '
         '"scorer": "text"}', 2, None, "NaN is not a value JSON has"),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path, row, line, field, message):
    path = write(tmp_path, dict(GOOD, id="q0"), row)
    with pytest.raises(TaskSuiteError) as err:
        load_suite(path, "all")
    assert err.value.line == line and err.value.field == field
    text = str(err.value)
    assert message in text and f"line {line}" in text and str(path) in text
    if field:
        assert f"field '{field}'" in text
    assert isinstance(err.value, EdgeRuntimeError)


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TaskSuiteError, match="holds no items"):
        load_suite(empty)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TaskSuiteError, match="line 1: not UTF-8"):
        load_suite(binary)
    # a Latin-1 line among UTF-8 ones: named by its line, as every other error in a suite (it gave a byte offset)
    latin = tmp_path / "latin.jsonl"
    good = json.dumps({"id": "a", "family": "f", "messages": [{"role": "user", "content": "hi"}], "answers": ["x"],
                       "scorer": "text"})
    latin.write_bytes((good + "\n" + good.replace('"a"', '"b"').replace("hi", "caf\xe9")).encode("latin-1"))
    with pytest.raises(TaskSuiteError) as info:
        load_suite(latin)
    assert info.value.line == 2 and "line 2: not UTF-8" in str(info.value)


def test_line_separators_inside_strings_and_a_bom_do_not_break_lines(tmp_path):
    row = dict(GOOD, messages=[{"role": "user", "content": "line1\u2028line2\u2029end\u0085"}])
    path = tmp_path / "suite.jsonl"
    # written raw, as dump_suite (ensure_ascii=False) writes them; a Windows editor's BOM in front
    path.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(dict(GOOD, id="q2")) + "\n",
                    encoding="utf-8")
    items = load_suite(path, "all")
    assert [i.id for i in items] == ["q1", "q2"] and "\u2028" in items[0].messages[0]["content"]
    dump_suite(items, tmp_path / "again.jsonl")
    assert [i.to_dict() for i in load_suite(tmp_path / "again.jsonl", "all")] == [i.to_dict() for i in items]


def test_a_file_named_like_a_built_in_suite_is_read_as_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    assert [i.id for i in load_suite("demo", "all")] == ["q1"]


def test_a_line_that_is_not_utf8_after_a_bom_is_named_by_its_line(tmp_path):
    # the decoder counted its position after the BOM: the offset was 3 short, and the line could be the one before
    good = json.dumps({"id": "a", "family": "f", "messages": [{"role": "user", "content": "hi"}], "answers": ["x"],
                       "scorer": "text"})
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (good + "\n" + good.replace('"a"', '"b"') + "\n").encode() + b"\xe9\n")
    with pytest.raises(TaskSuiteError) as info:
        load_suite(path)
    assert info.value.line == 3
