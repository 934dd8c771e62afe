"""Named task suites (generated, deterministic) and user suites from JSONL files."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.types import has_half_character, validate_messages
from ..errors import InvalidRequestError, TaskSuiteError
from . import _arithmetic, _facts, _sequences, _strings, _units, _word_problems, _yes_no
from ._build import assign_splits, collect
from ._scoring import check_answers
from ._types import TaskItem

__all__ = ["load_suite", "list_suites", "dump_suite", "summarize", "FAMILIES", "SPLITS", "SUITE_SEED"]

# changing the seed (or a generator) changes the questions: bump the version with it
SUITE_SEED = "edge-runtime-tasks-v1"
SPLITS = ("dev", "test", "all")
_FAMILY_MODULES = (_arithmetic, _word_problems, _units, _facts, _yes_no, _strings, _sequences)
FAMILIES: tuple[str, ...] = tuple(m.FAMILY for m in _FAMILY_MODULES)
# items per (family, difficulty, split) in the "demo" suite
_DEMO_PER_LEVEL = 2

_DESCRIPTIONS = {
    "default": "every family, about 1,200 items, half dev and half test",
    "demo": f"{_DEMO_PER_LEVEL} items per family and difficulty level and split (a quick end-to-end run)",
    **{f: f"the {f} family of the default suite" for f in FAMILIES},
}


@functools.cache
def _default_items() -> tuple[TaskItem, ...]:
    items: list[TaskItem] = []
    for mod in _FAMILY_MODULES:
        rng = random.Random(f"{SUITE_SEED}:{mod.FAMILY}")
        if hasattr(mod, "generate"):
            drafts = mod.generate(rng)
        else:
            drafts = collect(rng, mod.QUOTAS, mod.make, family=mod.FAMILY)
        items += assign_splits(mod.FAMILY, drafts)
    return tuple(items)


def _demo_items() -> list[TaskItem]:
    taken: dict[tuple[str, int, str], int] = {}
    out = []
    for item in sorted(_default_items(), key=lambda i: i.id):
        k = (item.family, int(item.features["difficulty"]), item.split)
        if taken.get(k, 0) < _DEMO_PER_LEVEL:
            taken[k] = taken.get(k, 0) + 1
            out.append(item)
    return out


def _fresh(item: TaskItem) -> TaskItem:
    # the cached items are shared: hand out copies whose dicts a caller may modify freely
    return dataclasses.replace(item, messages=tuple(dict(m) for m in item.messages), features=dict(item.features))


def list_suites() -> list[str]:
    """Names :func:`load_suite` accepts besides a JSONL path: ``default``, ``demo`` and one per family."""
    return list(_DESCRIPTIONS)


def describe_suites() -> dict[str, str]:
    return dict(_DESCRIPTIONS)


def load_suite(name: str | os.PathLike[str] = "default", split: str = "dev") -> list[TaskItem]:
    """Items of a built-in suite or of a JSONL file, for ``split`` ``"dev"``, ``"test"`` or ``"all"``.

    Built-in suites are generated from a fixed seed: the same items, ids and
    split on every machine. A JSONL file holds one item per line (see
    :func:`dump_suite`); items without a ``split`` field are assigned one from
    the hash of their id (half dev, half test).
    """
    if split not in SPLITS:
        raise TaskSuiteError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})", field="split")
    key = os.fspath(name)
    # a file of that name wins, as a bundle directory wins over a model name
    if key in _DESCRIPTIONS and not isinstance(name, os.PathLike) and not Path(key).is_file():
        if key == "default":
            items: Iterable[TaskItem] = _default_items()
        elif key == "demo":
            items = _demo_items()
        else:
            items = (i for i in _default_items() if i.family == key)
        return [_fresh(i) for i in items if split == "all" or i.split == split]
    path = Path(key)
    if not path.is_file():
        raise TaskSuiteError(
            f"unknown suite {key!r}: not a built-in suite ({', '.join(_DESCRIPTIONS)}) and no such file"
        )
    return [i for i in _read_jsonl(path) if split == "all" or i.split == split]


def first_items(items: Sequence[TaskItem], limit: int | None, *, field: str = "limit") -> list[TaskItem]:
    """``limit`` items taking each task family in turn (the first of every family, then the second, ...).

    A split lists its families one after the other, so its first N items would all be
    one family; any prefix of a family is a fair sample of it. None means all items.
    """
    if limit is None:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidRequestError(f"must be a positive number of items, got {limit!r}", field=field)
    by_family: dict[str, list[TaskItem]] = {}
    for item in items:
        by_family.setdefault(item.family, []).append(item)
    out: list[TaskItem] = []
    for rank in range(max((len(v) for v in by_family.values()), default=0)):
        out += [fam[rank] for fam in by_family.values() if rank < len(fam)]
        if len(out) >= limit:
            break
    return out[:limit]


def dump_suite(items: Iterable[TaskItem], path: str | os.PathLike[str]) -> int:
    """Write items as JSONL (the format :func:`load_suite` reads); returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


def summarize(items: Iterable[TaskItem]) -> dict[str, dict[str, int]]:
    """Item counts: family -> split -> count (plus ``"total"`` per family)."""
    out: dict[str, dict[str, int]] = {}
    for i in items:
        row = out.setdefault(i.family, {"dev": 0, "test": 0, "total": 0})
        row[i.split] = row.get(i.split, 0) + 1
        row["total"] += 1
    return out


_LINE_KEYS = ("id", "family", "messages", "answers", "scorer", "features", "split")
_ANSWER_TYPE = {"number": "number", "yesno": "yesno", "text": "text", "text_cs": "text", "exact": "text"}


def _read_jsonl(path: Path) -> list[TaskItem]:
    try:
        # "\n" only: splitlines() also breaks on U+2028/U+2029/U+0085, which JSON strings may hold raw
        # (dump_suite writes them so); utf-8-sig: a BOM from a Windows editor is not part of line 1
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:  # the line, as every other error in a suite names one (not a byte offset)
        raw = path.read_bytes()
        start = err.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)  # counted after it
        line = raw[:start].count(b"\n") + 1
        raise TaskSuiteError(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start})",
                             line=line) from err
    except OSError as err:
        raise TaskSuiteError(f"{path}: cannot read the suite file: {err}") from err
    items: list[TaskItem] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item = _parse_line(path, lineno, line)
        if item.id in first_line:
            raise TaskSuiteError(
                f"{path}, line {lineno}, field 'id': duplicate id {item.id!r} (first on line {first_line[item.id]})",
                line=lineno, field="id",
            )
        first_line[item.id] = lineno
        items.append(item)
    if not items:
        raise TaskSuiteError(f"{path}: the suite file holds no items")
    return items


class _FloatLiteral(float):
    """A JSON number with a fraction or exponent, remembering how it was written."""

    literal: str

    def __new__(cls, literal: str) -> "_FloatLiteral":
        value = super().__new__(cls, literal)
        value.literal = literal
        return value


def _parse_line(path: Path, lineno: int, line: str) -> TaskItem:
    def fail(field: str | None, message: str) -> TaskSuiteError:
        where = f"{path}, line {lineno}" + (f", field {field!r}" if field else "")
        return TaskSuiteError(f"{where}: {message}", line=lineno, field=field)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated = next((k for k in keys if keys.count(k) > 1), None)
        if repeated is not None:  # json keeps the last one, silently
            raise fail(repeated, "given twice")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise fail(None, f"{name} is not a value JSON has")

    try:
        obj = json.loads(line, object_pairs_hook=no_duplicates, parse_constant=no_constant, parse_float=_FloatLiteral)
    except json.JSONDecodeError as err:
        raise fail(None, f"not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(obj, Mapping):
        raise fail(None, f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_LINE_KEYS))
    if unknown:  # a misspelt "spilt" would otherwise put the item in a split by hash, silently
        raise fail(unknown[0], f"unknown field (known: {', '.join(_LINE_KEYS)})")
    for key, value in obj.items():  # an id with half a character failed later, as a traceback writing its run record
        if has_half_character(value):
            raise fail(key, "is not valid UTF-8 (a lone surrogate escape such as \\ud800: half a character)")
    for required in ("id", "family", "messages", "answers", "scorer"):
        if required not in obj:
            raise fail(required, "missing")
    for text_field in ("id", "family", "scorer"):
        if not isinstance(obj[text_field], str) or not obj[text_field].strip():
            raise fail(text_field, "must be a non-empty string")
    try:
        messages = validate_messages(obj["messages"], field_name="messages")
    except InvalidRequestError as err:
        raise fail(err.field or "messages", str(err).split(": ", 1)[-1]) from err
    # the model answers the last message, and the scorer reads the question from it
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise fail("messages", "the last message must be the user's question, with text")
    answers = obj["answers"]
    if isinstance(answers, (str, int, float)) and not isinstance(answers, bool):
        answers = [answers]
    if not isinstance(answers, Sequence) or isinstance(answers, str) or not answers:
        raise fail("answers", "must be a non-empty list of strings")
    if any(isinstance(a, bool) or not isinstance(a, (str, int, float)) for a in answers):
        raise fail("answers", "must be a non-empty list of strings")
    # an answer written as a JSON number keeps its digits: 12345678901234567890.0 is not 1.2345678901234567e+19
    answers = [a.literal if isinstance(a, _FloatLiteral) else a if isinstance(a, str) else str(a) for a in answers]
    problem = check_answers(obj["scorer"], answers)
    if not problem and not any(a.strip() for a in answers):
        problem = "no answer can be matched: every one is blank"
    if problem:
        raise fail("scorer" if problem.startswith("unknown scorer") else "answers", problem)
    features: Any = obj.get("features", {})
    if not isinstance(features, Mapping):
        raise fail("features", "must be an object")
    features = {"answer_type": _ANSWER_TYPE[obj["scorer"]], **features}
    split = obj.get("split")
    split = "" if split is None else split
    if split not in ("", "dev", "test"):
        raise fail("split", f"must be 'dev' or 'test', got {split!r}")
    if not split:
        split = "dev" if hashlib.sha256(obj["id"].encode("utf-8")).digest()[0] % 2 == 0 else "test"
    return TaskItem(
        id=obj["id"],
        family=obj["family"],
        messages=tuple(messages),
        answers=tuple(answers),
        scorer=obj["scorer"],
        features=features,
        split=split,
    )
